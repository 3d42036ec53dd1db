"""What every command shares: the resolved settings, the store, and printing.

Heavy imports (rich's tables, the amoCRM client) stay inside the functions that need them: cron
starts `amohook refresh-token` every 30 minutes, and it should cost little more than Python itself.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import typer

from amohook.settings import Settings


@dataclass
class State:
    settings: Settings
    _store: Any = field(default=None)

    def store(self):
        if self._store is None:
            from amohook.store import open_store

            self._store = open_store(self.settings.db_url, timeout=self.settings.db_timeout)
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
    """A plain line on stdout (no markup interpretation: messages may contain brackets)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")


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
