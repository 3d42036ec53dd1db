"""amoCRM's limit of 7 requests per second per account, shared by every process on one store.

Each process asks the store for a slot before each request: the grant times of the last requests
sit in one row per account, read and written under a row lock (``BEGIN IMMEDIATE`` on SQLite,
``SELECT … FOR UPDATE`` elsewhere) in a transaction that lasts microseconds, never across HTTP.
Over the limit amoCRM answers 429, and repeated violations get the account's API blocked
(docs/amocrm.md §3), so this is coordination, not a courtesy.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from amohook.store.models import RateWindow

if TYPE_CHECKING:
    from amohook.store import Store

RATE = 7
PER = 1.0
# Requests granted here arrive at amoCRM a little later and not always in grant order; the margin
# keeps any one-second window at amoCRM's end within the limit despite that jitter.
MARGIN = 0.15


class Limiter(Protocol):
    def acquire(self, key: str) -> None: ...


class NoLimit:
    def acquire(self, key: str) -> None:
        return None


def decide(grants: list[float], now: float, rate: int, window: float) -> tuple[bool, float, list[float]]:
    """Pure core: may a request go at ``now``? Returns (granted, wait seconds, grants to keep)."""
    recent = sorted(t for t in grants if t > now - window)
    if len(recent) < rate:
        return True, 0.0, recent + [now]
    return False, recent[-rate] + window - now, recent


class SharedRateLimiter:
    """A sliding-window limiter whose window lives in the store."""

    def __init__(
        self,
        store: Store,
        *,
        rate: int | None = None,
        per: float = PER,
        margin: float = MARGIN,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.store = store
        self.rate = RATE if rate is None else rate  # read now, not when this module was imported
        self.window = per + margin
        self.clock = clock
        self.sleep = sleep
        self.waited = 0.0
        self._known: set[str] = set()

    def acquire(self, key: str) -> None:
        if key not in self._known:
            RateWindow.insert(key=key, grants="[]").on_conflict_ignore().execute()
            self._known.add(key)
        while True:
            with self.store.write():
                query = RateWindow.select().where(RateWindow.key == key)
                row = self.store.for_update(query).get()
                granted, wait, keep = decide(json.loads(row.grants or "[]"), self.clock(), self.rate, self.window)
                if granted:
                    RateWindow.update(grants=json.dumps([round(t, 4) for t in keep])).where(
                        RateWindow.key == key
                    ).execute()
                    return
            pause = max(wait, 0.001) + random.uniform(0, 0.01)
            self.waited += pause
            self.sleep(pause)
