"""Durations as people write and read them: one grammar, one formatter, one set of messages.

Every option, environment variable and rules value that takes a duration (``--keep``,
``--reconcile``, ``--since``, ``--lease``, a task's ``due = "+1d"``, …) is read by
``parse_duration`` and every duration amohook prints goes through ``format_duration``, so what one
command prints another accepts (``1d 2h``), and a refused value always gets the same message: what
is wrong and the range that command accepts.

Grammar: one or more ``<number><unit>`` groups, largest unit first, each unit at most once, spaces
allowed between them — ``90s``, ``5m``, ``1.5h``, ``2h30m``, ``1d 12h``, ``1w`` (units: w, d, h, m,
s) — or a bare number of seconds (``300``, ``0.5``). Where "never" makes sense, ``off`` (also
``never``, ``none``, ``no`` and ``0``) means it and reads as None.
"""

from __future__ import annotations

import math
import re
from typing import Literal, overload

from amohook.errors import ConfigError

UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
OFF_WORDS = frozenset({"off", "never", "none", "no", "0"})
MAX_SECONDS = 366 * 86400  # the default upper bound: a year (and a day)
EXAMPLES = "90s, 5m, 2h, 1d12h"
MAX_TEXT = 10_000  # longer input is not read at all (outside input: env, rules files)
SHOWN_TEXT = 64  # how much of a refused value its message repeats

_GROUP = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([wdhms])", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


class DurationError(ConfigError, ValueError):
    """A duration that cannot be read or is out of range. A ``ConfigError`` (the CLI exits 2) and
    a ``ValueError`` (rules checks collect those as problems)."""


def accepted(low: float, high: float, off: bool) -> str:
    """The fix half of every duration message: the range this value accepts, and the grammar."""
    never = ", or off" if off else ""
    return f"give {format_duration(low)} to {format_duration(high)}{never} (written like {EXAMPLES})"


def refused(option: str, text: str, problem: str, low: float, high: float, off: bool) -> DurationError:
    """The one message format for a refused duration: what is wrong — the accepted range."""
    shown = text if len(text) <= SHOWN_TEXT else text[:SHOWN_TEXT] + "…"
    return DurationError(f"{option} '{shown}' is {problem} — {accepted(low, high, off)}")


@overload
def parse_duration(
    text: str | None,
    *,
    option: str,
    low: float = ...,
    high: float = ...,
    off: Literal[True] = ...,
    why_low: str = ...,
    shown: str | None = ...,
) -> float | None: ...
@overload
def parse_duration(
    text: str | None,
    *,
    option: str,
    low: float = ...,
    high: float = ...,
    off: Literal[False],
    why_low: str = ...,
    shown: str | None = ...,
) -> float: ...
@overload
def parse_duration(
    text: str | None,
    *,
    option: str,
    low: float = ...,
    high: float = ...,
    off: bool,
    why_low: str = ...,
    shown: str | None = ...,
) -> float | None: ...
def parse_duration(
    text: str | None,
    *,
    option: str,
    low: float = 1.0,
    high: float = MAX_SECONDS,
    off: bool = True,
    why_low: str = "",
    shown: str | None = None,
) -> float | None:
    """Seconds, or None for ``off`` where ``off`` is accepted; ``DurationError`` names ``option``,
    the problem and the range [``low``, ``high``]. ``why_low`` says why the floor is where it is;
    ``shown`` is the value as the user wrote it, when ``text`` is a part of it (a due date's offset)."""
    raw = "" if text is None else str(text)
    said = raw if shown is None else shown
    value = raw.strip().lower()
    if value in OFF_WORDS and (off or value != "0"):
        if off:
            return None
        raise refused(option, said, "not accepted here", low, high, off)
    seconds = _seconds(value) if len(value) <= MAX_TEXT else None
    if seconds is None:
        raise refused(option, said, "not a duration", low, high, off)
    if seconds < low:
        raise refused(option, said, "too short" + (f" ({why_low})" if why_low else ""), low, high, off)
    if seconds > high:
        raise refused(option, said, "too long", low, high, off)
    return seconds


def _seconds(value: str) -> float | None:
    """The grammar; None when ``value`` is not a duration. A huge number reads as infinity (too
    long, not unreadable): float() is linear in the digits, unlike int()."""
    if _NUMBER.fullmatch(value):
        return float(value)
    total, pos, last = 0.0, 0, -1
    order = list(UNITS)
    while pos < len(value):
        m = _GROUP.match(value, pos)
        if m is None:
            return None if value[pos:].strip() else (total if last >= 0 else None)
        rank = order.index(m.group(2).lower())
        if rank <= last:  # units largest first, each once: "1h1d" and "1m1m" are typos
            return None
        last = rank
        total += float(m.group(1)) * UNITS[order[rank]]
        pos = m.end()
    return total if last >= 0 else None


def format_duration(seconds: float | None, *, none: str = "—") -> str:
    """A duration for people, in the grammar ``parse_duration`` reads: the largest unit and the
    next one (``2d 3h``, ``5m 7s``, ``45s``; below a second ``0.25s``); ``none`` for None."""
    if seconds is None:
        return none
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if not math.isfinite(seconds):
        return "forever"
    if seconds < 1:
        return f"{seconds:.2g}s"
    s = int(seconds)
    shown = ("d", "h", "m", "s")
    for i, unit in enumerate(shown[:-1]):
        if s >= UNITS[unit]:
            first, rest = divmod(s, UNITS[unit])
            second = rest // UNITS[shown[i + 1]]
            return f"{first}{unit}" + (f" {second}{shown[i + 1]}" if second else "")
    return f"{s}s"
