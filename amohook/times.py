"""Points in time as text: one format for people, one for machines.

The store keeps Unix seconds. People read ``human_time``: this machine's local time with its zone,
as journald and cron show theirs (``2026-12-06 21:32:05 MSK``). Scripts read ``iso_time`` in every
``--json``: ISO 8601 in UTC with its zone designator (``2026-12-06T18:32:05Z``), never epoch numbers.
"""

from __future__ import annotations

import time


def human_time(ts: float | None, *, none: str = "—") -> str:
    """A time for people: local, to the second, with the zone's name."""
    if ts is None:
        return none
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def iso_time(ts: float | None) -> str | None:
    """A time for scripts (``--json``): ISO 8601, UTC, ``Z``; None stays None (JSON null)."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
