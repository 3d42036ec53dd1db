"""Commands for amoCRM's reference data: sync-entities, and the listings pipelines, task-types, users."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from amohook.cli.common import console, err_console, plain, print_json, say, state, warn

if TYPE_CHECKING:  # annotations only: the CLI imports rich and the models late, to start fast
    from rich.progress import TaskID

    from amohook.store.models import Stage

SubdomainOpt = Annotated[
    str | None, typer.Option("--subdomain", "-s", help="Account subdomain (the part before .amocrm.ru).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

NUMBERS = ("added", "changed", "removed", "unchanged", "total")
LABELS = {
    "pipelines": "pipelines",
    "stages": "stages",
    "task_types": "task types",
    "users": "users",
    "custom_fields": "lead custom fields",
}


@contextmanager
def _progress_display(enabled: bool):
    """A rich progress display on stderr; yields the sync's progress callback (or None)."""
    if not enabled:
        yield None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=err_console(),
        transient=True,
    ) as progress:
        tasks: dict[tuple[str, str], TaskID] = {}

        def on_progress(event) -> None:
            key = (event.account, event.kind)
            if key not in tasks:
                from rich.markup import escape

                from amohook.redact import printable

                tasks[key] = progress.add_task(
                    escape(printable(f"{event.account}: {LABELS[event.kind]}")), total=None, state=""
                )
            task = tasks[key]
            if event.phase == "fetch":
                progress.update(task, state=f"fetched {event.fetched}" if event.fetched else "fetching…")
            elif event.phase == "write":
                progress.update(task, state=f"writing {event.fetched}")
            else:
                progress.update(task, state=event.phase, total=1, completed=1)

        yield on_progress


def _summary(report) -> None:
    from amohook.cli.common import table

    columns = [("kind", "text"), *((col, "number") for col in NUMBERS), ("note", "text")]
    cells = [
        (LABELS[r.kind], str(r.added), str(r.changed), str(r.removed), str(r.unchanged), str(r.total), "")
        if r.status == "ok"
        else (LABELS[r.kind], "—", "—", "—", "—", "—", plain(r.status))
        for r in report.results
    ]
    console().print(table(plain(f"sync-entities: {report.account}"), columns, cells))
    limited = f", {report.rate_limited} answered 429" if report.rate_limited else ""
    say(f"{report.requests} requests in {report.seconds:.1f} s{limited}")
    failed = [LABELS[r.kind] for r in report.results if r.status == "failed"]
    if failed:
        say(f"not updated ({', '.join(failed)}): the rows stored before are kept as they were")
    for r in report.results:
        if r.skipped:
            warn(f"warning: {report.account}: {LABELS[r.kind]} skipped: {r.skipped}")
        elif r.error is not None and r.error is not report.error:  # the first error ends the run, below
            warn(f"warning: {report.account}: {LABELS[r.kind]} failed: {r.error.message}")


def sync_entities(
    ctx: typer.Context,
    subdomain: SubdomainOpt = None,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing unless it fails (for cron).")] = False,
):
    """Pull pipelines and stages, task types, users and lead custom fields into the store.

    Without --subdomain every stored account is synced. Each kind is replaced in one transaction,
    so a failure keeps the previous rows of that kind. Users need an admin's token; without one
    they are skipped and the rest is synced.
    """
    from amohook.amocrm.client import client_for
    from amohook.errors import AccountNotFound
    from amohook.sync import sync_entities as run_sync
    from amohook.tokens import all_accounts

    store = state(ctx).store()
    accounts = all_accounts(subdomain)
    if not accounts:
        raise AccountNotFound(None)
    reports = []
    show_progress = not (quiet or as_json) and err_console().is_terminal
    with _progress_display(show_progress) as on_progress:
        for account in accounts:
            client = client_for(store, account.subdomain)
            # Accounts are independent (own tokens, own rate limit): one failing does not stop the next.
            reports.append(run_sync(store, client, on_progress=on_progress))
    if as_json:
        print_json([r.as_dict() for r in reports])
    elif not quiet:
        for report in reports:
            _summary(report)
    for report in reports:
        report.raise_for_error()


def _account(ctx: typer.Context, subdomain: str | None):
    """The store and the account's subdomain the listings read."""
    from amohook.tokens import get_account

    store = state(ctx).store()
    return store, get_account(subdomain).subdomain


def _nothing_stored(sub: str, what: str) -> None:
    warn(f"no {what} stored for '{sub}' — run `amohook sync-entities --subdomain {sub}`")


def pipelines(ctx: typer.Context, subdomain: SubdomainOpt = None, as_json: JsonOpt = False):
    """List the stored pipelines with their stages (ids for rules and scripts)."""
    from amohook import listings

    store, sub = _account(ctx, subdomain)
    found = listings.pipelines(store, sub)
    rows = [entry.pipeline for entry in found]
    stages = {entry.pipeline.amo_id: entry.stages for entry in found}
    if as_json:
        print_json(
            [
                {
                    "id": p.amo_id,
                    "name": p.name,
                    "sort": p.sort,
                    "is_main": p.is_main,
                    "is_archive": p.is_archive,
                    "statuses": [
                        {"id": s.amo_id, "name": s.name, "sort": s.sort, "type": s.type, "color": s.color}
                        for s in stages.get(p.amo_id, [])
                    ],
                }
                for p in rows
            ]
        )
        return
    if not rows:
        return _nothing_stored(sub, "pipelines")
    from amohook.cli.common import table

    cells = []
    for p in rows:
        flags = [f for f, on in (("main", p.is_main), ("archived", p.is_archive)) if on]
        label = p.name + (f" ({', '.join(flags)})" if flags else "")
        members: list[Stage | None] = [*(stages.get(p.amo_id) or [])] or [None]
        for i, s in enumerate(members):
            row = (
                str(p.amo_id) if i == 0 else "",
                plain(label if i == 0 else ""),
                "" if s is None else str(s.amo_id),
                plain("" if s is None else s.name),
            )
            cells.append({"cells": row, "end_section": i == len(members) - 1})
    columns = (("pipeline id", "id"), ("pipeline", "text"), ("stage id", "id"), ("stage", "text"))
    console().print(table(plain(f"pipelines of {sub}"), columns, cells))


def task_types(ctx: typer.Context, subdomain: SubdomainOpt = None, as_json: JsonOpt = False):
    """List the stored task types."""
    from amohook import listings

    store, sub = _account(ctx, subdomain)
    rows = listings.task_types(store, sub)
    if as_json:
        print_json([{"id": t.amo_id, "name": t.name, "code": t.code, "color": t.color} for t in rows])
        return
    if not rows:
        return _nothing_stored(sub, "task types")
    from amohook.cli.common import table

    columns = (("id", "id"), ("name", "text"), ("code", "text"), ("color", "text"))
    cells = [(str(t.amo_id), plain(t.name), plain(t.code), plain(t.color)) for t in rows]
    console().print(table(plain(f"task types of {sub}"), columns, cells))


def users(ctx: typer.Context, subdomain: SubdomainOpt = None, as_json: JsonOpt = False):
    """List the stored users (synced only with an admin's token)."""
    from amohook import listings

    store, sub = _account(ctx, subdomain)
    rows = listings.users(store, sub)
    if as_json:
        print_json(
            [
                {"id": u.amo_id, "name": u.name, "email": u.email, "is_admin": u.is_admin, "is_active": u.is_active}
                for u in rows
            ]
        )
        return
    if not rows:
        return _nothing_stored(sub, "users")
    from amohook.cli.common import table

    columns = (("id", "id"), ("name", "text"), ("email", "text"), ("admin", "text"), ("active", "text"))
    cells = [
        (str(u.amo_id), plain(u.name), plain(u.email), "yes" if u.is_admin else "", "yes" if u.is_active else "no")
        for u in rows
    ]
    console().print(table(plain(f"users of {sub}"), columns, cells))


def register(app: typer.Typer) -> None:
    app.command("sync-entities")(sync_entities)
    app.command("pipelines")(pipelines)
    app.command("task-types")(task_types)
    app.command("users")(users)
