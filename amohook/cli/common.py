"""What every command shares: the resolved settings, the store, and printing.

Heavy imports (rich's tables, the amoCRM client) stay inside the functions that need them: cron
starts `amohook refresh-token` every 30 minutes, and it should cost little more than Python itself.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import typer

from amohook.durations import MAX_SECONDS
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


def table(title: Any, columns: Sequence[tuple[str, str]], rows: Iterable[Any], width: int | None = None):
    """A rich ``Table`` that reads at 80 columns, in a terminal and through a pipe (where rich
    takes $COLUMNS, or 80): nothing is cut or replaced by "…". ``columns``: (heading, kind); kind
    "id" or "number" (right-aligned, as wide as its longest value: never broken while the table
    can fit), "time" (a date stays whole) or "text" (wraps at spaces, folds a word too long). A
    row is a sequence of cells, or {"cells": [...], "end_section": True} to close a section."""
    from rich import box
    from rich.table import Table

    cells = [row["cells"] if isinstance(row, dict) else row for row in rows]
    sections = [isinstance(row, dict) and bool(row.get("end_section")) for row in rows]
    widths = _widths(columns, cells, (width or console().width) - (len(columns) - 1))
    grid = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0), title_justify="left")
    for (heading, kind), fixed in zip(columns, widths, strict=True):
        grid.add_column(heading, justify="right" if kind in ("id", "number") else "left", overflow="fold", width=fixed)
    for row, end in zip(cells, sections, strict=True):
        grid.add_row(*row, end_section=end)
    return grid


def _widths(columns: Sequence[tuple[str, str]], rows: list[Sequence[Any]], room: int) -> list[int | None]:
    """Column widths that fit ``room``: ids, numbers and times get what they need, text columns
    share the rest, the narrowest first (water-filling). None everywhere when all fits as it is.
    rich alone shrinks the widest columns first, so it broke 13-digit ids while a column of short
    words had room to wrap."""
    from rich.cells import cell_len

    def lengths(index: int, words: bool) -> list[int]:
        texts = [columns[index][0], *(str(row[index]) for row in rows)]
        if words:
            return [cell_len(word) for text in texts for word in text.split()] or [1]
        return [cell_len(line) for text in texts for line in text.splitlines() or [""]]

    natural = [max(lengths(i, words=False)) for i in range(len(columns))]
    if sum(natural) <= room:
        return [None] * len(columns)
    fixed: dict[int, int] = {}
    for i, (_, kind) in enumerate(columns):
        if kind in ("id", "number"):
            fixed[i] = max(max(lengths(i, words=True)), max(len(str(row[i])) for row in rows) if rows else 1)
        elif kind == "time":
            fixed[i] = max(lengths(i, words=True))
    text = sorted((i for i in range(len(columns)) if i not in fixed), key=lambda i: natural[i])
    left = max(len(text), room - sum(fixed.values()))
    out: dict[int, int] = dict(fixed)
    for n, i in enumerate(text):
        share = left // (len(text) - n)
        out[i] = max(1, min(natural[i], share))
        left -= out[i]
    return [out[i] for i in range(len(columns))]


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


@overload
def duration(
    ctx: typer.Context, name: str, *, low: float = ..., high: float = ..., off: Literal[True] = ..., why_low: str = ...
) -> float | None: ...
@overload
def duration(
    ctx: typer.Context, name: str, *, low: float = ..., high: float = ..., off: Literal[False], why_low: str = ...
) -> float: ...
def duration(
    ctx: typer.Context,
    name: str,
    *,
    low: float = 1.0,
    high: float = MAX_SECONDS,
    off: bool = True,
    why_low: str = "",
) -> float | None:
    """Duration option ``name`` of this command, read by the one grammar (amohook.durations);
    None only for ``off`` where ``off`` is accepted. A refused value's message names the flag, or
    the environment variable it came from, and the range [``low``, ``high``]."""
    from amohook.durations import parse_duration

    param = next(p for p in ctx.command.params if p.name == name)
    label = param.opts[0]
    source = ctx.get_parameter_source(name)
    if source is not None and source.name == "ENVIRONMENT" and isinstance(param.envvar, str):
        label = param.envvar
    return parse_duration(ctx.params[name], option=label, low=low, high=high, off=off, why_low=why_low)
