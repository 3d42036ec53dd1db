"""The root command: global options, the command groups, and the one error funnel."""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Any, cast

import typer

from amohook import __version__
from amohook.cli import auth
from amohook.cli.common import CONTEXT_SETTINGS, State
from amohook.errors import AmohookError, ExitCode

app = typer.Typer(
    name="amohook",
    no_args_is_help=True,
    add_completion=True,
    context_settings=CONTEXT_SETTINGS,
    pretty_exceptions_enable=False,
    help="Keep an amoCRM (Kommo) integration alive: tokens, reference data, webhooks, rules.",
)

_traceback_requested = False
_db_url: str | None = None  # the resolved database URL, for the funnel's messages


def _version(value: bool):
    if value:
        print(f"amohook {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    db_url: Annotated[
        str | None,
        typer.Option(
            "--db-url",
            envvar="AMOHOOK_DB_URL",
            help="Database URL: sqlite:///PATH, mysql://USER:PASS@HOST/DB or postgresql://USER:PASS@HOST/DB. "
            "Default: amohook.db in $AMOHOOK_DATA_DIR, else in systemd's $STATE_DIRECTORY, else in the per-user "
            "data directory.",
            show_envvar=True,
        ),
    ] = None,
    traceback: Annotated[bool, typer.Option("--traceback", help="Show the stack trace of an error.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
):
    from amohook.settings import Settings, resolve_db_timeout, resolve_db_url

    global _traceback_requested, _db_url
    _traceback_requested = traceback
    _db_url = resolve_db_url(db_url)
    ctx.obj = State(Settings(db_url=_db_url, traceback=traceback, db_timeout=resolve_db_timeout()))


app.command("init-auth")(auth.init_auth)
app.command("auth-url")(auth.auth_url)
app.command("refresh-token")(auth.refresh_token)
app.command("status")(auth.status)


def _register_groups() -> None:
    """The other command groups: each module joins itself to ``app``, in this order (``--help``'s)."""
    from amohook.cli import doctor, events, prune, reconcile, rules, serve, sync

    for module in (sync, serve, events, rules, reconcile, prune, doctor):
        module.register(app)


_register_groups()


def _is_click_exception(exc: BaseException) -> bool:
    return hasattr(exc, "show") and hasattr(exc, "exit_code")


@functools.cache
def command() -> Any:
    """The Click command typer builds from ``app``, built once per process: building it costs
    ~40 ms, which a program that calls ``run`` many times (the test suite) would pay each time."""
    import typer.main

    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every failure ends here as one line and an exit code from ``ExitCode``."""
    code = run(argv)
    sys.exit(int(code))


def run(argv: list[str] | None = None) -> int:
    try:
        result = command()(args=argv, standalone_mode=False, prog_name="amohook")
        return int(result or 0) if isinstance(result, int) else 0
    except AmohookError as exc:
        _report(exc, f"error: {exc.message}")
        return int(exc.exit_code)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        return int(ExitCode.INTERRUPTED)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return int(ExitCode.INTERRUPTED)
    except Exception as exc:  # the funnel: anything else is either Click's usage error or a bug
        if _is_click_exception(exc):
            cast(Any, exc).show()  # a Click exception (typer ships its own Click)
            return int(ExitCode.USAGE)
        if type(exc).__name__ == "Abort":
            sys.stderr.write("aborted\n")
            return int(ExitCode.INTERRUPTED)
        from amohook.errors import StoreError, first_line

        try:
            import peewee

            if isinstance(exc, peewee.PeeweeException):
                from amohook.store.open import needs_person

                person = needs_person(exc, _db_url) if _db_url else None
                if person is not None:
                    _report(exc, f"error: {person.message}")
                    return int(person.exit_code)
                err = StoreError(
                    f"database error: {first_line(exc)} — check --db-url / AMOHOOK_DB_URL and that the database "
                    "server is up"
                )
                _report(exc, f"error: {err.message}")
                return int(err.exit_code)
        except ImportError:
            pass
        _report(exc, f"error: unexpected {type(exc).__name__} — run again with --traceback and report it")
        return int(ExitCode.ERROR)


def _report(exc: BaseException, line: str) -> None:
    import logging

    from amohook.cli.logs import stderr_line

    if _traceback_requested or os.environ.get("AMOHOOK_TRACEBACK"):
        import traceback

        # Frames only, never local variables: they would hold tokens and secrets.
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip("\n")
        sys.stderr.write(stderr_line(text, logging.ERROR) + "\n")
    from amohook.redact import printable

    # Messages may quote amoCRM's answers; under systemd the line carries the journal's error priority.
    sys.stderr.write(stderr_line(printable(line, multiline=True), logging.ERROR) + "\n")
