"""`amohook doctor`: one line per check (✓, ! or ✗) and the fix under each one that is not ✓.

The exit code tells cron and monitoring the overall state without parsing: 0 all well,
``DEGRADED`` (7) warnings only, ``UNHEALTHY`` (6) at least one failing check.
"""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from amohook.cli.common import print_json, say, state
from amohook.times import iso_time

MARKS = {"ok": "✓", "warning": "!", "error": "✗"}
ASCII_MARKS = {"ok": "ok", "warning": "warn", "error": "FAIL"}


def _marks() -> dict:
    """✓/✗ where the terminal (or cron's mail) can encode them, words otherwise (LANG=C on old systems)."""
    try:
        "✓✗".encode(sys.stdout.encoding or "ascii")
        return MARKS
    except (UnicodeEncodeError, LookupError):
        return ASCII_MARKS


def doctor(
    ctx: typer.Context,
    rules: Annotated[
        str | None,
        typer.Option(
            "--rules", envvar="AMOHOOK_RULES", show_envvar=True, help="Also check this rules file against the store."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for monitoring.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only what is not ✓ (nothing when all is well): for cron mail.")
    ] = False,
):
    """Check everything (database, tokens, clock, rules, subscriptions, reconciliation, queue, disk) and say the fix."""
    from amohook.errors import ExitCode
    from amohook.ops.doctor import open_store_checked, run_checks, worst

    now = time.time()
    store, failed = open_store_checked(state(ctx).settings.db_url)
    checks = [failed] if store is None else run_checks(store, rules_path=rules, now=now)
    overall = worst(checks)
    if as_json:
        print_json({"status": overall, "checked_at": iso_time(now), "checks": [c.as_dict() for c in checks]})
    else:
        marks = _marks()
        for c in checks:
            if quiet and c.ok:
                continue
            label = f"{c.name} ({c.account})" if c.account else c.name
            say(f"{marks[c.severity]} {label}: {c.detail}")
            if c.fix and not c.ok:
                say(f"    fix: {c.fix}")
        if not quiet:
            errors = sum(c.severity == "error" for c in checks)
            warnings = sum(c.severity == "warning" for c in checks)
            if overall == "ok":
                say(f"all {len(checks)} checks passed")
            else:
                say(f"{errors} failing, {warnings} warning(s), {len(checks) - errors - warnings} fine")
    code = {"ok": ExitCode.OK, "warning": ExitCode.DEGRADED, "error": ExitCode.UNHEALTHY}[overall]
    if code:
        raise typer.Exit(int(code))


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
