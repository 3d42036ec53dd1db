"""What every command shares: the resolved settings, the store, and printing.

Heavy imports (rich's tables, the amoCRM client) stay inside the functions that need them: cron
starts `amohook refresh-token` every 30 minutes, and it should cost little more than Python itself.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import typer

from amohook.redact import printable
from amohook.settings import Settings

# Every Typer app and sub-app: `-h` as well as `--help`.
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


@dataclass
class State:
    settings: Settings
    _store: Any = field(default=None)

    def store(self, *, create: bool = False):
        """The store the settings name. Only the commands that start one (``create``: init-auth,
        auth-url, serve, worker) make it; the rest say there is none, so a mistyped path or another
        working directory never yields a second, empty store that looks fine."""
        if self._store is None:
            from amohook.store import open_store

            self._store = open_store(self.settings.db_url, timeout=self.settings.db_timeout, create=create)
            for note in self._store.notes:
                warn(f"warning: {note}")
        return self._store


def state(ctx: typer.Context) -> State:
    root = ctx.find_root()
    return root.obj


_console = None
_err_console = None


def console():
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(highlight=False, soft_wrap=True)
    return _console


def err_console():
    global _err_console
    if _err_console is None:
        from rich.console import Console

        _err_console = Console(stderr=True, highlight=False, soft_wrap=True)
    return _err_console


def say(message: str) -> None:
    """A plain line on stdout: no markup interpretation (messages may contain brackets), and
    control characters from outside data shown as escapes, never sent to the terminal."""
    sys.stdout.write(printable(message, multiline=True) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    """A warning of a one-shot command on stderr (under systemd, with the journal's warning priority)."""
    from amohook.cli.logs import stderr_line

    sys.stderr.write(stderr_line(printable(message, multiline=True), 30) + "\n")  # 30: logging.WARNING
    sys.stderr.flush()


def plain(value: Any):
    """Outside text (an amoCRM name, a subdomain, an error) as a rich ``Text``: shown literally,
    never read as markup (``[/]`` would crash a table, ``[bold]`` would vanish)."""
    from rich.text import Text

    return Text(printable("" if value is None else value))


# json.dumps escapes C0 controls but not DEL, C1 (\x9b is a CSI on some terminals) nor the
# Unicode controls that reorder text; outside strings only, so \uXXXX keeps the JSON valid.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def print_json(data: Any) -> None:
    text = json.dumps(data, ensure_ascii=False, indent=2, default=str)
    sys.stdout.write(_JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n")


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    sign = "-" if seconds < 0 else ""
    s = abs(int(seconds))
    if s >= 86400:
        return f"{sign}{s // 86400}d {s % 86400 // 3600}h"
    if s >= 3600:
        return f"{sign}{s // 3600}h {s % 3600 // 60}m"
    if s >= 60:
        return f"{sign}{s // 60}m"
    return f"{sign}{s}s"


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
