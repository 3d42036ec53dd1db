"""The durable inbox: deliveries and their events, the group-commit writer, and the queue.

The receive path only stores: ``GroupCommitter`` takes what request threads hand it and commits it
in batches (one transaction, one fsync per batch) before any request is answered. The worker path
only processes: ``claim`` leases due events, ``complete``/``fail`` finish them if the lease is still
ours, ``release`` gives back what was claimed but not started. They meet in the ``event`` table.

Times are Unix seconds (float), as everywhere in the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import peewee

from amohook.errors import StoreError
from amohook.store.models import Attempt, Delivery, Event
from amohook.webhooks.parse import BodyRejected, ParsedWebhook

log = logging.getLogger("amohook.inbox")

# Headers worth keeping with a delivery (FACTS.md §5 "Transport": amoCRM's agent and request id);
# the proxy ones say who really sent it when the listener sits behind nginx.
USEFUL_HEADERS = (
    "user-agent",
    "x-amocrm-requestid",
    "content-type",
    "content-length",
    "x-forwarded-for",
    "x-real-ip",
    "x-forwarded-proto",
)
HEADER_MAX = 512
ERROR_MAX = 2000
INSERT_CHUNK = 50  # rows per multi-row INSERT: far below every backend's parameter limit

# Column sizes of models.Event: MySQL and PostgreSQL refuse longer values, so a body that would
# not fit is refused with 400 up front instead of failing the whole batch with 503.
_LIMITS = {"entity": 64, "action": 64, "entity_id": 64, "account": 190, "account_id": 32}


class StoreUnavailable(StoreError):
    """The delivery could not be committed; the listener answers 503 and amoCRM retries.

    ``committed`` is False when it certainly was not stored, None when a commit was in flight
    (it may land after the 503; the retry is then deduplicated by its body hash).
    """

    def __init__(self, message: str, *, committed: bool | None = False):
        super().__init__(message)
        self.committed = committed


# --- receive path ------------------------------------------------------------------------------


@dataclass
class Incoming:
    """One webhook request that passed the parser, ready to be stored."""

    body: bytes
    parsed: ParsedWebhook
    content_type: str | None = None
    headers: dict = field(default_factory=dict)
    remote_addr: str | None = None
    received_at: float = field(default_factory=time.time)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


@dataclass(frozen=True)
class Stored:
    delivery_id: int
    new: bool  # False: the same body was stored before (an amoCRM retry); no new events
    events: int


def useful_headers(headers: Iterable[tuple[str, str]]) -> dict:
    """The headers kept with a delivery, names lower-cased, values cut to a sane length."""
    kept: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if key in USEFUL_HEADERS and key not in kept:
            kept[key] = str(value)[:HEADER_MAX]
    return kept


def check_storable(body: bytes, parsed: ParsedWebhook) -> None:
    """Refuse (``BodyRejected``, 400) what every backend could not store as sent.

    PostgreSQL text cannot hold NUL, and the event columns have fixed sizes; amoCRM never sends
    either, so such a body is a bad request, not a reason to fail the batch it would join.
    """
    if b"\x00" in body:
        raise BodyRejected("NUL byte in body")
    values = [("account", parsed.account_subdomain), ("account_id", parsed.account_id)]
    for event in parsed.events:
        values += [("entity", event.entity), ("action", event.action), ("entity_id", event.entity_id)]
    for name, value in values:
        if value is None:
            continue
        if len(value) > _LIMITS[name]:
            raise BodyRejected(f"{name} longer than {_LIMITS[name]} characters")
        if "\x00" in value:
            raise BodyRejected(f"NUL character in {name}")


_sqlite_locks: dict[str, threading.Lock] = {}
_sqlite_locks_guard = threading.Lock()


@contextmanager
def write_txn(store):
    """``store.write()``, queued in-process first on SQLite.

    SQLite has one write lock per file and its busy handler sleeps in growing steps, so threads of
    one process that fight over it stall each other for tens of milliseconds; a plain mutex in
    front hands the lock over at once. Other processes still meet at SQLite's own lock.
    """
    if not store.is_sqlite:
        with store.write():
            yield
        return
    key = str(store.db.database)
    with _sqlite_locks_guard:
        lock = _sqlite_locks.setdefault(key, threading.Lock())
    with lock:
        with store.write():
            yield


def store_deliveries(store, items: Sequence[Incoming]) -> list[Stored]:
    """Store deliveries and their events in ONE transaction; known bodies only count a resend."""
    with write_txn(store):
        return _store_in_txn(items)


def _store_in_txn(items: Sequence[Incoming]) -> list[Stored]:
    shas = [item.sha256 for item in items]
    known: dict[str, int] = {
        row.body_sha256: row.id
        for row in Delivery.select(Delivery.id, Delivery.body_sha256).where(Delivery.body_sha256.in_(sorted(set(shas))))
    }
    resent: Counter = Counter()
    results: list[Stored] = []
    for item, sha in zip(items, shas):
        if sha in known:
            resent[sha] += 1
            results.append(Stored(known[sha], False, 0))
            continue
        delivery_id = Delivery.insert(
            body_sha256=sha,
            body=item.body.decode("utf-8"),  # the parser accepted it, so it is strict UTF-8
            content_type=(item.content_type or None) and item.content_type[:255],
            headers=json.dumps(item.headers, ensure_ascii=False, sort_keys=True),
            remote_addr=(item.remote_addr or None) and item.remote_addr[:64],
            received_at=item.received_at,
            times_received=1,
        ).execute()
        known[sha] = delivery_id
        rows = [
            {
                "delivery_id": delivery_id,
                "idx": idx,
                "entity": ev.entity,
                "action": ev.action,
                "entity_id": ev.entity_id,
                "account": item.parsed.account_subdomain,
                "account_id": item.parsed.account_id,
                "data": json.dumps(ev.data, ensure_ascii=False, separators=(",", ":")),
                "status": "pending",
                "attempts": 0,
                "next_attempt_at": item.received_at,
                "received_at": item.received_at,
                "updated_at": item.received_at,
            }
            for idx, ev in enumerate(item.parsed.events)
        ]
        for start in range(0, len(rows), INSERT_CHUNK):
            Event.insert_many(rows[start : start + INSERT_CHUNK]).execute()
        results.append(Stored(delivery_id, True, len(rows)))
    for sha, count in resent.items():
        Delivery.update(times_received=Delivery.times_received + count).where(Delivery.body_sha256 == sha).execute()
    return results


_QUEUED, _TAKEN, _ABANDONED = "queued", "taken", "abandoned"


class _Ticket:
    __slots__ = ("item", "size", "state", "done", "result", "error")

    def __init__(self, item: Incoming):
        self.item = item
        self.size = len(item.body)
        self.state = _QUEUED
        self.done = threading.Event()
        self.result: Stored | None = None
        self.error: BaseException | None = None


class GroupCommitter:
    """One writer thread that commits what request threads hand it, many requests per transaction.

    A request calls ``submit`` and waits on its own ``threading.Event``. The writer takes everything
    queued (up to ``max_batch`` items / ``max_batch_bytes``), commits it in one transaction and
    releases each waiter with its result or the failure. While one batch is being fsynced the next
    one gathers, so the cost of durability is paid once per batch, not once per request.

    A request that gives up waiting (``timeout``) is withdrawn if the writer has not taken it yet,
    so a 503 then means "not stored". If the writer already took it, the commit may still land
    after the 503; amoCRM resends and the resend is deduplicated by the body hash — harmless.
    """

    def __init__(
        self,
        store,
        *,
        max_batch: int = 200,
        max_batch_bytes: int = 16 * 1024 * 1024,
        retries: int = 2,
        on_commit: Callable[[int], None] | None = None,
        logger: logging.Logger | None = None,
    ):
        self.store = store
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.retries = retries
        self.on_commit = on_commit
        self.log = logger or log
        self._queue: deque[_Ticket] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # figures for tests and the benchmark
        self.batches = 0
        self.committed = 0
        self.largest_batch = 0

    def start(self) -> "GroupCommitter":
        self._thread = threading.Thread(target=self._run, name="amohook-writer", daemon=True)
        self._thread.start()
        return self

    def submit(self, item: Incoming, timeout: float) -> Stored:
        """Store ``item`` durably or raise ``StoreUnavailable``; waits at most ``timeout`` seconds."""
        ticket = _Ticket(item)
        with self._cond:
            if self._stopping or self._thread is None:
                raise StoreUnavailable("the listener is shutting down")
            self._queue.append(ticket)
            self._cond.notify()
        if not ticket.done.wait(timeout):
            with self._cond:
                if ticket.state == _QUEUED:
                    ticket.state = _ABANDONED
                    raise StoreUnavailable(f"no commit within {timeout:.1f} s (withdrawn)", committed=False)
            if not ticket.done.wait(0):
                raise StoreUnavailable(f"no commit within {timeout:.1f} s (commit in flight)", committed=None)
        if ticket.error is not None:
            raise StoreUnavailable(f"cannot store the delivery: {_describe(ticket.error)}") from None
        assert ticket.result is not None
        return ticket.result

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def stop(self, timeout: float = 5.0) -> None:
        """Commit what is queued, then stop the writer; later ``submit`` calls fail at once."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        # Whatever is still queued now will never be committed: release its waiters.
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        for ticket in left:
            ticket.error = StoreUnavailable("the listener stopped before this delivery was stored")
            ticket.done.set()

    def _take(self) -> list[_Ticket] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait(0.5)
            batch: list[_Ticket] = []
            size = 0
            while self._queue and len(batch) < self.max_batch:
                ticket = self._queue[0]
                if ticket.state == _ABANDONED:
                    self._queue.popleft()
                    continue
                if batch and size + ticket.size > self.max_batch_bytes:
                    break
                self._queue.popleft()
                ticket.state = _TAKEN
                batch.append(ticket)
                size += ticket.size
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
            _close_quietly(self.store)

    def _commit(self, batch: list[_Ticket]) -> None:
        error: BaseException | None = None
        results: list[Stored] = []
        for attempt in range(self.retries + 1):
            try:
                results = store_deliveries(self.store, [t.item for t in batch])
                error = None
                break
            except (peewee.OperationalError, peewee.IntegrityError, peewee.InterfaceError) as exc:
                # A deadlock, a lost connection, or another process inserting the same body first:
                # drop this thread's connection and try the whole batch again.
                error = exc
                _close_quietly(self.store)
                if attempt < self.retries:
                    time.sleep(0.02 * (attempt + 1))
            except Exception as exc:  # anything else is not going to get better by retrying
                error = exc
                _close_quietly(self.store)
                break
        if error is not None:
            self.log.error("storing %d deliveries failed: %s", len(batch), _describe(error))
            for ticket in batch:
                ticket.error = error
                ticket.done.set()
            return
        self.batches += 1
        self.committed += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        for ticket, result in zip(batch, results):
            ticket.result = result
            ticket.done.set()
        if self.on_commit is not None and any(r.events for r in results):
            try:
                self.on_commit(sum(r.events for r in results))
            except Exception:  # a wake-up hook must never break the write path
                self.log.exception("on_commit hook failed")


# --- worker path -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InboxEvent:
    """What a handler gets: one entity item of one webhook, as queued."""

    id: int
    delivery_id: int
    entity: str  # "leads", "contacts", "companies", "tasks", "unsorted", ...
    action: str  # "add", "update", "status", "delete", "note", ...
    entity_id: str | None
    account: str | None  # the account subdomain as sent
    account_id: str | None
    data: dict
    received_at: float
    attempts: int  # attempts made before this one (0 on the first run)


def _to_inbox_event(row: Event) -> InboxEvent:
    try:
        data = json.loads(row.data or "{}")
    except ValueError:
        data = {}
    return InboxEvent(
        id=row.id,
        delivery_id=row.delivery_id,
        entity=row.entity,
        action=row.action,
        entity_id=row.entity_id,
        account=row.account,
        account_id=row.account_id,
        data=data,
        received_at=row.received_at,
        attempts=row.attempts,
    )


def _due(now: float):
    return ((Event.status == "pending") & (Event.next_attempt_at <= now)) | (
        (Event.status == "running") & (Event.lease_until < now)
    )


def claim(
    store,
    owner: str,
    *,
    limit: int,
    lease_seconds: float,
    max_attempts: int,
    now: float,
) -> list[InboxEvent]:
    """Lease up to ``limit`` due events to ``owner``, oldest first, in one short transaction.

    Due: pending whose time has come, or running whose lease ran out (its worker died or
    stalled). Such an expired run counts as an attempt, recorded as ``expired``; an event whose
    attempts are then used up is marked dead instead of being claimed again, so a body that crashes
    every worker cannot loop forever. SQLite: ``write_txn`` (BEGIN IMMEDIATE) serialises claimers;
    MySQL/PostgreSQL: FOR UPDATE SKIP LOCKED lets claimers pass each other's rows.
    """
    with write_txn(store):
        query = (
            Event.select(Event.id, Event.status, Event.attempts, Event.updated_at, Event.lease_owner)
            .where(_due(now))
            .order_by(Event.id)
            .limit(limit)
        )
        rows = list(store.for_update(query, skip_locked=True))
        if not rows:
            return []
        expired = [r for r in rows if r.status == "running"]
        dead_ids: list[int] = []
        for row in expired:
            Attempt.create(
                event_id=row.id,
                worker=row.lease_owner or "?",
                started_at=row.updated_at,
                finished_at=now,
                outcome="expired",
                error="lease expired: the worker died or stalled while holding this event",
            )
            if row.attempts + 1 >= max_attempts:
                dead_ids.append(row.id)
        if expired:
            Event.update(attempts=Event.attempts + 1).where(Event.id.in_([r.id for r in expired])).execute()
        if dead_ids:
            Event.update(
                status="dead",
                lease_owner=None,
                lease_until=None,
                last_error="lease expired on the last attempt (the worker died or stalled)",
                updated_at=now,
            ).where(Event.id.in_(dead_ids)).execute()
        dead_set = set(dead_ids)
        ids = [r.id for r in rows if r.id not in dead_set]
        if not ids:
            return []
        Event.update(status="running", lease_owner=owner, lease_until=now + lease_seconds, updated_at=now).where(
            Event.id.in_(ids)
        ).execute()
        claimed = list(Event.select().where(Event.id.in_(ids)).order_by(Event.id))
    return [_to_inbox_event(row) for row in claimed]


def _ours(event_id: int, owner: str):
    return (Event.id == event_id) & (Event.lease_owner == owner) & (Event.status == "running")


def complete(store, event_id: int, owner: str, *, started_at: float, now: float) -> bool:
    """Mark done if the lease is still ``owner``'s; record the attempt either way."""
    with write_txn(store):
        won = (
            Event.update(
                status="done",
                attempts=Event.attempts + 1,
                lease_owner=None,
                lease_until=None,
                last_error=None,
                updated_at=now,
            )
            .where(_ours(event_id, owner))
            .execute()
        )
        Attempt.create(
            event_id=event_id,
            worker=owner,
            started_at=started_at,
            finished_at=now,
            outcome="ok" if won else "lost",
            error=None if won else "finished after the lease was lost; another worker may run it again",
        )
    return bool(won)


def fail(
    store,
    event_id: int,
    owner: str,
    *,
    error: str,
    retry_at: float | None,
    started_at: float,
    now: float,
) -> bool:
    """Schedule a retry at ``retry_at``, or mark dead when it is None; lease-checked like ``complete``."""
    error = error[:ERROR_MAX]
    with write_txn(store):
        values: dict[str, Any] = {
            "attempts": Event.attempts + 1,
            "lease_owner": None,
            "lease_until": None,
            "last_error": error,
            "updated_at": now,
        }
        if retry_at is None:
            values["status"] = "dead"
        else:
            values["status"] = "pending"
            values["next_attempt_at"] = retry_at
        won = Event.update(**values).where(_ours(event_id, owner)).execute()
        outcome = ("dead" if retry_at is None else "retry") if won else "lost"
        Attempt.create(event_id=event_id, worker=owner, started_at=started_at, finished_at=now, outcome=outcome, error=error)
    return bool(won)


def release(store, event_ids: Sequence[int], owner: str, *, now: float) -> int:
    """Give back claimed events that were never started: pending again, due at once, no attempt."""
    if not event_ids:
        return 0
    with write_txn(store):
        return (
            Event.update(status="pending", lease_owner=None, lease_until=None, next_attempt_at=now, updated_at=now)
            .where(Event.id.in_(list(event_ids)) & (Event.lease_owner == owner) & (Event.status == "running"))
            .execute()
        )


def renew(store, event_ids: Sequence[int], owner: str, *, lease_seconds: float, now: float) -> int:
    """Extend the lease on events ``owner`` still holds; returns how many it still holds."""
    if not event_ids:
        return 0
    with write_txn(store):
        return (
            Event.update(lease_until=now + lease_seconds)
            .where(Event.id.in_(list(event_ids)) & (Event.lease_owner == owner) & (Event.status == "running"))
            .execute()
        )


# --- operator path -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayResult:
    queued: list[int]
    skipped: dict[int, str]  # id -> why not


def replay(store, event_ids: Sequence[int] = (), *, dead: bool = False, now: float) -> ReplayResult:
    """Queue events again (pending, due now, attempts reset); running ones are left to their worker."""
    with write_txn(store):
        if dead:
            ids = [row.id for row in Event.select(Event.id).where(Event.status == "dead").order_by(Event.id)]
        else:
            ids = list(dict.fromkeys(int(i) for i in event_ids))
        found = {row.id: row.status for row in Event.select(Event.id, Event.status).where(Event.id.in_(ids))} if ids else {}
        skipped: dict[int, str] = {}
        queued: list[int] = []
        for event_id in ids:
            status = found.get(event_id)
            if status is None:
                skipped[event_id] = "no such event"
            elif status == "running":
                skipped[event_id] = "running now (a worker holds it); replay it after it finishes"
            else:
                queued.append(event_id)
        for start in range(0, len(queued), 500):
            Event.update(
                status="pending", attempts=0, next_attempt_at=now, lease_owner=None, lease_until=None, updated_at=now
            ).where(Event.id.in_(queued[start : start + 500])).execute()
    return ReplayResult(queued, skipped)


@dataclass(frozen=True)
class QueueStats:
    pending: int
    due: int
    running: int
    dead: int
    oldest_pending_age: float | None  # seconds since the oldest pending event was received


def queue_stats(store, *, now: float) -> QueueStats:
    """Counts by status (done is not counted: it only grows) and the age of the oldest pending."""
    counts = dict(
        Event.select(Event.status, peewee.fn.COUNT(Event.id))
        .where(Event.status.in_(["pending", "running", "dead"]))
        .group_by(Event.status)
        .tuples()
    )
    due = Event.select().where(_due(now)).count()
    oldest = Event.select(peewee.fn.MIN(Event.received_at)).where(Event.status == "pending").scalar()
    return QueueStats(
        pending=int(counts.get("pending", 0)),
        due=int(due),
        running=int(counts.get("running", 0)),
        dead=int(counts.get("dead", 0)),
        oldest_pending_age=None if oldest is None else max(0.0, now - float(oldest)),
    )


def list_events(store, *, status: str | None = None, entity: str | None = None, limit: int = 50) -> list[Event]:
    """Newest first."""
    query = Event.select()
    if status:
        query = query.where(Event.status == status)
    if entity:
        query = query.where(Event.entity == entity)
    return list(query.order_by(Event.id.desc()).limit(limit))


@dataclass(frozen=True)
class EventDetail:
    event: Event
    delivery: Delivery | None
    attempts: list[Attempt]


def event_detail(store, event_id: int) -> EventDetail | None:
    event = Event.get_or_none(Event.id == event_id)
    if event is None:
        return None
    delivery = Delivery.get_or_none(Delivery.id == event.delivery_id)
    attempts = list(Attempt.select().where(Attempt.event_id == event_id).order_by(Attempt.started_at, Attempt.id))
    return EventDetail(event, delivery, attempts)


# --- helpers -----------------------------------------------------------------------------------


def _close_quietly(store) -> None:
    """Drop this thread's connection (after an error, or when the thread ends)."""
    try:
        store.close()
    except Exception:
        pass


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__
