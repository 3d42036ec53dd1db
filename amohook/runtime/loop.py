"""What the supervisor runs: the ``Loop`` protocol, the stop every loop shares, and ``Periodic``.

A loop is a name, a ``run(stop)`` that returns once ``stop`` is set, and a ``health()`` the
status page and ``/metrics`` read (plain numbers and short strings, no driver messages). The
listener, each worker thread, the action sender and the background passes (reconciliation,
pruning) are loops; the supervisor starts each in a thread of its own and stops them together
within one deadline (``StopEvent.remaining``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from amohook.durations import format_duration
from amohook.errors import describe

if TYPE_CHECKING:
    from amohook.store import Store

# Every loop of `serve` and `worker` stops within this: a running handler finishes, the listener
# answers what it read and commits it, the sender records the outcome of its batch in flight.
STOP_SECONDS = 9.0


@runtime_checkable
class Loop(Protocol):
    """One thing the supervisor runs in a thread of its own."""

    @property
    def name(self) -> str:
        """Unique among the supervisor's loops; names its thread and its line on the status page."""

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set, then return (within ``remaining(stop)`` seconds)."""

    def health(self) -> dict[str, Any]:
        """Figures for the status page and /metrics, from memory (no database read)."""


class StopEvent(threading.Event):
    """Set by SIGTERM/SIGINT (``signal`` names which), by ``Supervisor.stop``, or by a failing loop.

    It carries the one stop deadline: ``set`` starts it (``STOP_SECONDS``), every loop sees the same
    ``remaining()``. Callbacks given to ``on_set`` run when it is set (a worker asleep on its own
    wake-up event hears of the stop at once).
    """

    signal: str | None = None

    def __init__(self, seconds: float = STOP_SECONDS):
        super().__init__()
        self.seconds = seconds
        self.deadline: float | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._callbacks_lock = threading.Lock()

    def set(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.seconds
        super().set()
        with self._callbacks_lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()

    def on_set(self, callback: Callable[[], None]) -> None:
        with self._callbacks_lock:
            self._callbacks.append(callback)
        if self.is_set():
            callback()

    def remaining(self) -> float:
        """Seconds left of the stop deadline (the whole of it before ``set``)."""
        if self.deadline is None:
            return self.seconds
        return max(0.0, self.deadline - time.monotonic())

    def log_signal(self, logger: logging.Logger) -> None:
        # Logged by the main loop, not in the handler: a handler that writes to stderr while the
        # main thread is writing there raises "reentrant call" inside the io buffer.
        if self.signal:
            logger.info("received %s; stopping (send it again to exit at once)", self.signal)


def remaining(stop: threading.Event, default: float = STOP_SECONDS) -> float:
    """The stop deadline's seconds left for a loop given any event (a plain one: ``default``)."""
    return stop.remaining() if isinstance(stop, StopEvent) else default


def on_stop(stop: threading.Event, callback: Callable[[], None]) -> None:
    """Call ``callback`` when ``stop`` is set, if it can say so (a ``StopEvent``)."""
    if isinstance(stop, StopEvent):
        stop.on_set(callback)


class Periodic:
    """A background pass every ``every`` seconds (the first after ``first_after``).

    A failing pass is logged in one shape for every periodic loop (``<name> pass failed (next in
    5m): <error>``, WARNING) and tried again at the next interval; the loop itself never dies of
    it. ``store``'s connection is closed after each pass: a thread that sleeps for an hour holds
    none.
    """

    def __init__(
        self,
        name: str,
        step: Callable[[threading.Event], object],
        every: float,
        *,
        first_after: float = 0.0,
        store: Store | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.name = name
        self.step = step
        self.every = every
        self.first_after = first_after
        self.store = store
        self.log = logger or logging.getLogger(f"amohook.{name}")
        self.clock = clock
        self.passes = 0
        self.failures = 0
        self.last_pass_at: float | None = None
        self.last_error: str | None = None

    def run(self, stop: threading.Event) -> None:
        wait = self.first_after
        while not stop.wait(wait):
            wait = self.every
            try:
                self.step(stop)
                self.passes += 1
                self.last_pass_at = self.clock()
                self.last_error = None
            except Exception as exc:  # the store or amoCRM is down: the next pass tries again
                self.failures += 1
                self.last_error = describe(exc)
                self.log.warning(
                    "%s pass failed (next in %s): %s", self.name, format_duration(self.every), describe(exc)
                )
            finally:
                if self.store is not None:
                    self.store.close_quietly()

    def health(self) -> dict[str, Any]:
        return {
            "every": self.every,
            "passes": self.passes,
            "failures": self.failures,
            "last_pass_at": self.last_pass_at,
            "last_error": self.last_error,
        }
