"""One thread that reads the store when asked, shared by every request that wants the result.

``/healthz``, ``/status`` and ``/metrics`` are polled by monitors, sometimes from many places at
once; a read per request would hold a database connection per request (a PostgreSQL server has
100 by default). An ``OnDemandReader`` reads on its own thread and its own connection, at most
once per ``fresh`` seconds and only when someone asks; a request waits at most ``wait`` seconds
for a new read and otherwise gets the last one. A failed read keeps the last good value and
reports the failure's class (never a driver's message, host or port); it is logged at most once
a minute.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from amohook import inbox
from amohook.errors import describe

T = TypeVar("T")
LOG_SECONDS = 60.0


class Unreadable(Exception):
    """A read that failed for a reason worth showing as it is (not a database failure)."""


class OnDemandReader(Generic[T]):
    def __init__(
        self,
        store,
        read: Callable[[], T],
        *,
        name: str,
        what: str,
        fresh: float,
        wait: float,
        logger: logging.Logger,
        keep_last: bool = True,
    ):
        self.store = store
        self.read_fn = read
        self.name = name  # the thread's name
        self.what = what  # for the log: "healthz", "status page"
        self.fresh = fresh
        self.wait = wait
        self.log = logger
        self.keep_last = keep_last  # on a failed read: keep the last good value, or show none
        self.reads = 0  # how many reads were made (tests check the caching with it)
        self._cond = threading.Condition()
        self._value: T | None = None
        self._error: str | None = None
        self._read_at = -1e18  # monotonic time of the last attempt, good or not
        self._wanted = False
        self._halt = False
        self._logged_at = -LOG_SECONDS
        self._thread: threading.Thread | None = None

    def start(self) -> OnDemandReader[T]:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        with self._cond:
            self._halt = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)  # a read stuck on a hung database must not hold up stopping

    def get(self) -> tuple[T | None, str | None, float]:
        """(the latest value or None, why the last read failed or None, its age in seconds)."""
        with self._cond:
            if time.monotonic() - self._read_at > self.fresh:
                started = self._read_at
                self._wanted = True
                self._cond.notify_all()
                deadline = time.monotonic() + self.wait
                while self._read_at == started and not self._halt:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            return self._value, self._error, time.monotonic() - self._read_at

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._wanted and not self._halt:
                        self._cond.wait()
                    if self._halt:
                        return
                    self._wanted = False
                self._read()
        finally:
            self.store.close_quietly()

    def _read(self) -> None:
        value, error = (self._value if self.keep_last else None), None
        try:
            value = self.read_fn()
        except Unreadable as exc:
            error = str(exc)
        except Exception as exc:  # the database is down or slow: say so, keep the last value
            error = inbox.failure_class(exc)
            self.store.close_quietly()
            if time.monotonic() - self._logged_at >= LOG_SECONDS:
                self._logged_at = time.monotonic()
                self.log.warning("%s: the database cannot be read: %s (%s)", self.what, error, describe(exc))
        with self._cond:
            self.reads += 1
            self._value = value
            self._error = error
            self._read_at = time.monotonic()
            self._cond.notify_all()
