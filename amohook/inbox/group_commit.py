"""GroupCommitter: the listener's one writer thread, many requests per transaction."""

from __future__ import annotations

import _thread
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import peewee

from amohook.errors import describe
from amohook.inbox import receive
from amohook.inbox.receive import (
    CHECKPOINT_SECONDS,
    FAILURE_HINTS,
    FAILURE_LOG_SECONDS,
    Incoming,
    Stored,
    StoreUnavailable,
    failure_class,
)

if TYPE_CHECKING:
    from amohook.store import Store

log = logging.getLogger("amohook.inbox")


@dataclass(frozen=True)
class CommitHealth:
    """What the writer knows about its own commits: kept in memory, read by /healthz for free."""

    failing: bool  # the last commit attempt failed and none has succeeded since
    failure: str | None  # the class of the last failure ("disk full", …), never the driver's text
    failing_since: float | None  # Unix time of the first failure of the current run of failures
    failed_batches: int  # batches failed since the last success
    last_ok_at: float | None
    last_failure_at: float | None


_QUEUED, _TAKEN, _ABANDONED = "queued", "taken", "abandoned"


class _Ticket:
    __slots__ = ("item", "size", "state", "done", "result", "error", "on_done")

    def __init__(self, item: Incoming, on_done: Callable[[_Ticket], None] | None = None):
        self.item = item
        self.on_done = on_done  # ``submit_later``: called by the writer instead of a waiting thread
        self.size = len(item.body)
        self.state = _QUEUED
        # A bare lock as a one-shot signal, held until the writer releases it: the cheapest
        # hand-over CPython has (an Event adds a Condition and its lock to every wake-up).
        self.done = _thread.allocate_lock()
        self.done.acquire()
        self.result: Stored | None = None
        self.error: BaseException | None = None


def ticket_outcome(ticket: _Ticket) -> Stored:
    """What a finished ticket came to: its ``Stored``, or ``StoreUnavailable`` raised."""
    if ticket.error is not None:
        raise StoreUnavailable(f"cannot store the delivery: {describe(ticket.error)}") from None
    assert ticket.result is not None
    return ticket.result


class GroupCommitter:
    """One writer thread that commits what request threads hand it, many requests per transaction.

    A request calls ``submit`` and waits on its own ticket. The writer takes everything queued
    (up to ``max_batch`` items / ``max_batch_bytes``), commits it in one transaction and releases
    each waiter with its result or the failure. While one batch is being committed the next one
    gathers, so the cost of durability is paid once per batch, not once per request.

    A request that gives up waiting (``timeout``) is withdrawn if the writer has not taken it yet,
    so a 503 then means "not stored". If the writer already took it, the commit may still land
    after the 503; amoCRM resends and the resend is deduplicated by the body hash — harmless.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = 200,
        max_batch_bytes: int = 16 * 1024 * 1024,
        retries: int = 2,
        on_commit: Callable[[int], None] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        logger: logging.Logger | None = None,
    ):
        self.store = store
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.retries = retries
        self.on_commit = on_commit
        self.on_batch = on_batch  # (deliveries, seconds) after each commit: /metrics' latency
        self.log = logger or log
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards ticket states and the flags below
        self._waiting = 0
        self._stopping = False
        self._carry: _Ticket | None = None
        self._thread: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._halt = threading.Event()
        self._configured = None  # the writer connection that has had its autocheckpoint turned off
        # How commits are going, for /healthz (read without touching the database) and the log.
        self._failing_since: float | None = None
        self._failed_batches = 0
        self._failure: str | None = None
        self._last_ok_at: float | None = None
        self._last_failure_at: float | None = None
        self._failure_logged_at = 0.0
        # figures for tests and the benchmark
        self.batches = 0
        self.committed = 0
        self.largest_batch = 0

    def start(self) -> GroupCommitter:
        self._thread = threading.Thread(target=self._run, name="amohook-writer", daemon=True)
        self._thread.start()
        if self.store.is_sqlite:
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="amohook-checkpoint", daemon=True)
            self._checkpointer.start()
        return self

    def _checkpoint_loop(self) -> None:
        """SQLite: copy the WAL into the database file beside the writer, not in its commits.

        By default the connection whose commit takes the WAL past 1,000 pages checkpoints right
        then, inside the commit that a batch of requests is waiting for. Here the writer's
        connection does not (``wal_autocheckpoint=0``) and this thread runs a PASSIVE checkpoint
        (it never blocks the writer) every ``CHECKPOINT_SECONDS``. Durability is unchanged: a
        commit is durable once its WAL frames are synced (synchronous=FULL).
        """
        try:
            while not self._halt.wait(CHECKPOINT_SECONDS):
                try:
                    self.store.db.execute_sql("PRAGMA wal_checkpoint(PASSIVE)")
                except Exception as exc:
                    self.log.debug("checkpoint failed: %s", describe(exc))
                    self.store.close_quietly()
        finally:
            self.store.close_quietly()

    def _no_autocheckpoint(self) -> None:
        connection = self.store.db.connection()
        if connection is not self._configured:
            connection.execute("PRAGMA wal_autocheckpoint=0")
            self._configured = connection

    def submit(self, item: Incoming, timeout: float) -> Stored:
        """Store ``item`` durably or raise ``StoreUnavailable``; waits at most ``timeout`` seconds."""
        ticket = _Ticket(item)
        self._enqueue(ticket)
        if not ticket.done.acquire(timeout=timeout):
            failure = self.give_up(ticket, timeout)
            if failure is not None:
                raise failure
        return ticket_outcome(ticket)

    def submit_later(self, item: Incoming, on_done: Callable[[_Ticket], None]) -> _Ticket:
        """Queue ``item`` without waiting: the writer calls ``on_done(ticket)`` once it is committed
        or has failed (read it with ``ticket_outcome``); ``give_up`` withdraws it. The listener's event
        loop stores a whole request this way without a thread of its own waiting for it."""
        ticket = _Ticket(item, on_done)
        self._enqueue(ticket)
        return ticket

    def _enqueue(self, ticket: _Ticket) -> None:
        with self._lock:
            if self._stopping or self._thread is None:
                raise StoreUnavailable("the listener is shutting down")
            self._waiting += 1
        self._queue.put(ticket)

    def give_up(self, ticket: _Ticket, timeout: float) -> StoreUnavailable | None:
        """The waiter stops waiting after ``timeout`` seconds: withdraw ``ticket`` if the writer has
        not taken it; the failure to answer with, or None when it was finished after all."""
        with self._lock:
            if ticket.state == _QUEUED:
                ticket.state = _ABANDONED
                self._waiting -= 1
                return StoreUnavailable(f"no commit within {timeout:.1f} s (withdrawn)", committed=False)
        if ticket.on_done is None and ticket.done.acquire(timeout=0):
            return None
        return StoreUnavailable(f"no commit within {timeout:.1f} s (commit in flight)", committed=None)

    def _finish(self, ticket: _Ticket) -> None:
        """Wake the ticket's waiter, or call its ``on_done``."""
        if ticket.on_done is None:
            ticket.done.release()
            return
        try:
            ticket.on_done(ticket)
        except Exception:  # the listener's hook must never break the write path
            self.log.exception("on_done hook failed")

    def queued(self) -> int:
        """Requests handed over and not yet taken into a batch."""
        with self._lock:
            return self._waiting

    def health(self) -> CommitHealth:
        """How the last commits went; no database access."""
        with self._lock:
            return CommitHealth(
                failing=self._failing_since is not None,
                failure=self._failure,
                failing_since=self._failing_since,
                failed_batches=self._failed_batches,
                last_ok_at=self._last_ok_at,
                last_failure_at=self._last_failure_at,
            )

    def _record_failure(self, error: BaseException, size: int) -> None:
        """Remember the failure for /healthz; log its cause at once, then at most once a minute."""
        now = time.time()
        kind = failure_class(error)
        with self._lock:
            first = self._failing_since is None or kind != self._failure
            if self._failing_since is None:
                self._failing_since = now
            self._failed_batches += 1
            self._failure = kind
            self._last_failure_at = now
            due = first or time.monotonic() - self._failure_logged_at >= FAILURE_LOG_SECONDS
            if due:
                self._failure_logged_at = time.monotonic()
            failed, since = self._failed_batches, self._failing_since
        if not due:
            return
        hint = FAILURE_HINTS.get(kind, "see the database's own log")
        if first and failed == 1:
            self.log.error(
                "commits failing: %s (%s) storing %d deliveries — %s; webhooks are answered 503 "
                "and amoCRM retries them",
                kind,
                describe(error),
                size,
                hint,
            )
        else:
            self.log.error(
                "commits still failing: %s (%s); %d batches failed in %.0f s — %s",
                kind,
                describe(error),
                failed,
                now - since,
                hint,
            )

    def _record_success(self) -> None:
        now = time.time()
        with self._lock:
            recovered = self._failing_since
            failed = self._failed_batches
            self._failing_since = None
            self._failed_batches = 0
            self._failure = None
            self._last_ok_at = now
        if recovered is not None:
            self.log.warning("commits succeed again after %d failed batches in %.0f s", failed, now - recovered)

    def stop(self, timeout: float = 5.0) -> None:
        """Commit what is queued, then stop the writer; later ``submit`` calls fail at once."""
        with self._lock:
            self._stopping = True
        self._queue.put(None)  # wakes the writer; it drains what came before and ends
        if self._thread is not None:
            self._thread.join(timeout)
        self._halt.set()
        if self._checkpointer is not None:
            self._checkpointer.join(1.0)
        # Whatever is still queued now will never be committed: release its waiters.
        left = [self._carry] if self._carry is not None else []
        self._carry = None
        while True:
            try:
                ticket = self._queue.get_nowait()
            except queue.Empty:
                break
            if ticket is not None:
                left.append(ticket)
        with self._lock:
            left = [t for t in left if t.state == _QUEUED]
            for ticket in left:
                ticket.state = _TAKEN
                self._waiting -= 1
        for ticket in left:
            ticket.error = StoreUnavailable("the listener stopped before this delivery was stored")
            self._finish(ticket)

    def _take(self) -> list[_Ticket] | None:
        """The next batch: everything queued now; None: stop."""
        taken: list[_Ticket] = []
        stop = False
        if self._carry is not None:
            taken.append(self._carry)
            self._carry = None
        else:
            first = self._queue.get()
            if first is None:
                stop = True
            else:
                taken.append(first)
        while not stop and len(taken) < self.max_batch:
            try:
                ticket = self._queue.get_nowait()
            except queue.Empty:
                break
            if ticket is None:
                stop = True
            else:
                taken.append(ticket)
        batch: list[_Ticket] = []
        size = 0
        with self._lock:
            for ticket in taken:
                if ticket.state == _ABANDONED:
                    continue
                if batch and size + ticket.size > self.max_batch_bytes and self._carry is None:
                    self._carry = ticket  # the next batch starts with it
                    continue
                if self._carry is ticket:
                    continue
                ticket.state = _TAKEN
                self._waiting -= 1
                batch.append(ticket)
                size += ticket.size
        if stop:
            if batch:
                self._commit(batch)
            while self._carry is not None:  # drain what the byte limit held back
                carried, self._carry = self._carry, None
                with self._lock:
                    if carried.state != _QUEUED:
                        continue
                    carried.state = _TAKEN
                    self._waiting -= 1
                self._commit([carried])
            return None
        return batch

    def _run(self) -> None:
        try:
            while True:
                batch = self._take()
                if batch is None:
                    return
                if batch:
                    self._commit(batch)
        finally:
            self.store.close_quietly()

    def _commit(self, batch: list[_Ticket]) -> None:
        error: BaseException | None = None
        results: list[Stored] = []
        started = time.perf_counter()
        for attempt in range(self.retries + 1):
            try:
                if self._checkpointer is not None:
                    self._no_autocheckpoint()
                results = receive.store_deliveries(self.store, [t.item for t in batch])
                error = None
                break
            except (peewee.OperationalError, peewee.IntegrityError, peewee.InterfaceError) as exc:
                # A deadlock, a lost connection, or another process inserting the same body first:
                # drop this thread's connection and try the whole batch again.
                error = exc
                self.store.close_quietly()
                if attempt < self.retries:
                    time.sleep(0.02 * (attempt + 1))
            except Exception as exc:  # anything else is not going to get better by retrying
                error = exc
                self.store.close_quietly()
                break
        if error is not None:
            if len(batch) > 1 and not isinstance(error, (peewee.OperationalError, peewee.InterfaceError)):
                # Something in one delivery that the checks did not foresee: do not let it fail the
                # others. (A database that is down fails them all anyway, so that is not retried.)
                self.log.warning(
                    "a batch of %d failed (%s); storing its deliveries one by one", len(batch), describe(error)
                )
                for ticket in batch:
                    self._commit([ticket])
                return
            self._record_failure(error, len(batch))
            for ticket in batch:
                ticket.error = error
                self._finish(ticket)
            return
        if self._failing_since is not None or self._last_ok_at is None or time.time() - self._last_ok_at > 1.0:
            self._record_success()
        self.batches += 1
        self.committed += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        if self.on_batch is not None:
            try:
                self.on_batch(len(batch), time.perf_counter() - started)
            except Exception:  # an observer must never break the write path
                self.log.exception("on_batch hook failed")
        for ticket, result in zip(batch, results, strict=True):
            ticket.result = result
            self._finish(ticket)
        if self.on_commit is not None and any(r.events for r in results):
            try:
                self.on_commit(sum(r.events for r in results))
            except Exception:  # a wake-up hook must never break the write path
                self.log.exception("on_commit hook failed")
