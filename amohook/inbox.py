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
import _thread
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import peewee

from amohook.errors import StoreError, describe
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
INSERT_CHUNK = 200  # rows per multi-row INSERT: 2,600 parameters, far below every backend's limit
CHECKPOINT_SECONDS = 0.5  # SQLite: how often the listener's WAL is copied into the database file
STATEMENT_BYTES = 4 * 1024 * 1024  # below MariaDB's default max_allowed_packet (16 MiB)

# Column sizes of models.Event: MySQL and PostgreSQL refuse longer values, so a body that would
# not fit is refused with 400 up front instead of failing the whole batch with 503.
_LIMITS = {"entity": 64, "action": 64, "entity_id": 64, "account": 190, "account_id": 32}


FAILURE_LOG_SECONDS = 60.0  # while commits keep failing, the cause is logged again at most this often


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

    PostgreSQL text cannot hold NUL, no backend takes a lone UTF-16 surrogate (JSON can write
    one as ``"\\ud800"``), and the event columns have fixed sizes; amoCRM sends none of these, so
    such a body is a bad request, not a reason to fail the batch it would join.
    """
    if b"\x00" in body:
        raise BodyRejected("NUL byte in body")
    if b"\\u" in body and b"\\ud" in body.lower():  # cheap test first: only JSON escapes make surrogates
        try:
            json.dumps(parsed.payload, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BodyRejected("a lone UTF-16 surrogate in a JSON string") from None
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


def write_txn(store):
    """The inbox's write transaction: ``store.write()`` (which queues this process's threads on
    SQLite before they meet at its lock)."""
    return store.write()


def store_deliveries(store, items: Sequence[Incoming]) -> list[Stored]:
    """Store deliveries and their events in ONE transaction; known bodies only count a resend."""
    if not items:
        return []
    try:
        with write_txn(store):
            with _driver_errors_as_peewee():  # as the ORM's own queries raise them
                return _store_in_txn(store, items)
    except peewee.PeeweeException as exc:
        raise unmask(exc) from None


def unmask(exc: BaseException) -> BaseException:
    """The error that made a transaction fail, not the failed rollback that followed it.

    SQLite ends the transaction itself on some errors (SQLITE_FULL: "database or disk is full",
    https://www.sqlite.org/lang_transaction.html "Response To Errors Within A Transaction"); the
    rollback on the way out then fails with "cannot rollback - no transaction is active", and that
    would hide the cause.
    """
    seen = 0
    while seen < 5 and "no transaction is active" in str(exc) and isinstance(exc.__context__, Exception):
        exc = exc.__context__
        seen += 1
    return exc


# What an operator can act on, by the database's own words (SQLite, MariaDB/MySQL, PostgreSQL).
# Only the class goes to /healthz: a driver's message may name the host, port or user.
_FAILURE_CLASSES = (
    ("disk full", ("database or disk is full", "no space left", "disk full", "is full", "could not extend file",
                   "errno 28", "(1114", "(1021")),
    ("database read-only", ("readonly database", "read-only", "read only")),
    ("database locked", ("database is locked", "lock wait timeout", "deadlock", "could not obtain lock")),
    ("too many database connections", ("too many connections", "too many clients", "remaining connection slots")),
    ("database unreachable", ("could not connect", "connection refused", "server closed the connection",
                              "lost connection", "gone away", "can't connect", "connection to server",
                              "terminating connection", "no route to host", "timed out", "(2003", "(2006", "(2013")),
    ("database file unusable", ("disk i/o error", "malformed", "not a database", "unable to open")),
)


def failure_class(exc: BaseException) -> str:
    """A short, secret-free name for why the store failed: "disk full", "database unreachable", …"""
    text = f"{exc} {exc.args!r}".lower()
    for name, needles in _FAILURE_CLASSES:
        if any(needle in text for needle in needles):
            return name
    if isinstance(exc, peewee.InterfaceError):
        return "database unreachable"
    return f"database error ({type(exc).__name__})"


_HINTS = {
    "disk full": "free space on the disk holding the store (or raise the database's size quota)",
    "database read-only": "the store or its directory is not writable by this user",
    "database locked": "another process holds the database's write lock too long",
    "too many database connections": "the database server is out of connection slots",
    "database unreachable": "check that the database server is up and reachable",
    "database file unusable": "check the disk and the store file",
}


@dataclass(frozen=True)
class CommitHealth:
    """What the writer knows about its own commits: kept in memory, read by /healthz for free."""

    failing: bool  # the last commit attempt failed and none has succeeded since
    failure: str | None  # the class of the last failure ("disk full", …), never the driver's text
    failing_since: float | None  # Unix time of the first failure of the current run of failures
    failed_batches: int  # batches failed since the last success
    last_ok_at: float | None
    last_failure_at: float | None


def _driver_errors_as_peewee():
    return peewee.__exception_wrapper__


_DELIVERY_COLUMNS = ("body_sha256", "body", "content_type", "headers", "remote_addr", "received_at", "times_received")
_EVENT_COLUMNS = (
    "delivery_id", "idx", "entity", "action", "entity_id", "account", "account_id", "data",
    "status", "attempts", "next_attempt_at", "received_at", "updated_at",
)


def _chunks(rows: list[tuple], size_of, max_rows: int = INSERT_CHUNK, max_bytes: int = STATEMENT_BYTES):
    """Rows in groups small enough for one statement (parameter count, MySQL's max_allowed_packet)."""
    group: list[tuple] = []
    size = 0
    for row in rows:
        row_size = size_of(row)
        if group and (len(group) >= max_rows or size + row_size > max_bytes):
            yield group
            group, size = [], 0
        group.append(row)
        size += row_size
    if group:
        yield group


def _store_in_txn(store, items: Sequence[Incoming]) -> list[Stored]:
    # Plain multi-row SQL, a handful of statements per batch whatever its size: this is the
    # listener's hot path. Each statement releases and re-takes the GIL, which under a burst means
    # waiting behind the request threads; statement-per-row through the ORM cost more than the
    # commit itself (bench/ack.py).
    db = store.db
    p = db.param
    q = lambda name: name.join(db.quote)  # noqa: E731
    delivery, event = q(Delivery._meta.table_name), q(Event._meta.table_name)
    sha_col, id_col = q("body_sha256"), q("id")
    cursor = db.cursor()
    shas = [item.sha256 for item in items]
    distinct = sorted(set(shas))

    def lookup(wanted: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for group in _chunks([(sha,) for sha in wanted], lambda row: 64):
            cursor.execute(
                f"SELECT {sha_col}, {id_col} FROM {delivery} WHERE {sha_col} IN ({', '.join([p] * len(group))})",
                [row[0] for row in group],
            )
            found.update((sha, int(delivery_id)) for sha, delivery_id in cursor.fetchall())
        return found

    known = lookup(distinct)
    new_rows: list[tuple] = []
    fresh: dict[str, Incoming] = {}
    for item, sha in zip(items, shas):
        if sha in known or sha in fresh:
            continue
        fresh[sha] = item
        new_rows.append(
            (
                sha,
                item.body.decode("utf-8"),  # the parser accepted it, so it is strict UTF-8
                _printable(item.content_type, 255),
                _headers_json(item.headers),
                _printable(item.remote_addr, 64),
                item.received_at,
                1,
            )
        )
    _insert_many(cursor, delivery, _DELIVERY_COLUMNS, new_rows, q, p, lambda row: len(row[1]) + 256)
    ids = lookup(list(fresh)) if fresh else {}
    event_rows: list[tuple] = []
    for sha, item in fresh.items():
        parsed = item.parsed
        for idx, ev in enumerate(parsed.events):
            event_rows.append(
                (
                    ids[sha], idx, ev.entity, ev.action, ev.entity_id, parsed.account_subdomain,
                    parsed.account_id, _data_json(ev.data),
                    "pending", 0, item.received_at, item.received_at, item.received_at,
                )
            )
    _insert_many(cursor, event, _EVENT_COLUMNS, event_rows, q, p, lambda row: len(row[7]) + 256)

    results: list[Stored] = []
    resent: Counter = Counter()
    for item, sha in zip(items, shas):
        if sha in fresh and fresh[sha] is item:
            results.append(Stored(ids[sha], True, len(item.parsed.events)))
        else:
            resent[sha] += 1
            results.append(Stored(known.get(sha) or ids[sha], False, 0))
    for sha, count in resent.items():
        cursor.execute(
            f"UPDATE {delivery} SET {q('times_received')} = {q('times_received')} + {p} WHERE {sha_col} = {p}",
            (count, sha),
        )
    return results


# Built once: json.dumps with options builds a new encoder on every call (the writer's hot loop).
_headers_json = json.JSONEncoder(ensure_ascii=False, sort_keys=True).encode
_data_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

_CONTROL = dict.fromkeys([*range(0x20), 0x7F])


def _printable(text: str | None, limit: int) -> str | None:
    """Header-borne text for a plain column: control characters (NUL breaks PostgreSQL) dropped."""
    return (text.translate(_CONTROL)[:limit] or None) if text else None


def _insert_many(cursor, table: str, columns: tuple, rows: list[tuple], q, p, size_of) -> None:
    placeholders = "(" + ", ".join([p] * len(columns)) + ")"
    head = f"INSERT INTO {table} ({', '.join(q(c) for c in columns)}) VALUES "
    for group in _chunks(rows, size_of):
        cursor.execute(head + ", ".join([placeholders] * len(group)), [value for row in group for value in row])


_QUEUED, _TAKEN, _ABANDONED = "queued", "taken", "abandoned"


class _Ticket:
    __slots__ = ("item", "size", "state", "done", "result", "error")

    def __init__(self, item: Incoming):
        self.item = item
        self.size = len(item.body)
        self.state = _QUEUED
        # A bare lock as a one-shot signal, held until the writer releases it: the cheapest
        # hand-over CPython has (an Event adds a Condition and its lock to every wake-up).
        self.done = _thread.allocate_lock()
        self.done.acquire()
        self.result: Stored | None = None
        self.error: BaseException | None = None


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

    def start(self) -> "GroupCommitter":
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
        with self._lock:
            if self._stopping or self._thread is None:
                raise StoreUnavailable("the listener is shutting down")
            self._waiting += 1
        self._queue.put(ticket)
        if not ticket.done.acquire(timeout=timeout):
            with self._lock:
                if ticket.state == _QUEUED:
                    ticket.state = _ABANDONED
                    self._waiting -= 1
                    raise StoreUnavailable(f"no commit within {timeout:.1f} s (withdrawn)", committed=False)
            if not ticket.done.acquire(timeout=0):
                raise StoreUnavailable(f"no commit within {timeout:.1f} s (commit in flight)", committed=None)
        if ticket.error is not None:
            raise StoreUnavailable(f"cannot store the delivery: {describe(ticket.error)}") from None
        assert ticket.result is not None
        return ticket.result

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
        hint = _HINTS.get(kind, "see the database's own log")
        if first and failed == 1:
            self.log.error("commits failing: %s (%s) storing %d deliveries — %s; webhooks are answered 503 "
                           "and amoCRM retries them", kind, describe(error), size, hint)
        else:
            self.log.error("commits still failing: %s (%s); %d batches failed in %.0f s — %s",
                           kind, describe(error), failed, now - since, hint)

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
            ticket.done.release()

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
        for attempt in range(self.retries + 1):
            try:
                if self._checkpointer is not None:
                    self._no_autocheckpoint()
                results = store_deliveries(self.store, [t.item for t in batch])
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
                self.log.warning("a batch of %d failed (%s); storing its deliveries one by one", len(batch), describe(error))
                for ticket in batch:
                    self._commit([ticket])
                return
            self._record_failure(error, len(batch))
            for ticket in batch:
                ticket.error = error
                ticket.done.release()
            return
        if self._failing_since is not None or self._last_ok_at is None or time.time() - self._last_ok_at > 1.0:
            self._record_success()
        self.batches += 1
        self.committed += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        for ticket, result in zip(batch, results):
            ticket.result = result
            ticket.done.release()
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
    source: str = "webhook"  # "events_log": recovered by reconciliation from amoCRM's events log


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
        source=row.source or "webhook",
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
    missing: list[int] = field(default_factory=list)  # ids of no event: then nothing is queued


def replay(store, event_ids: Sequence[int] = (), *, dead: bool = False, now: float) -> ReplayResult:
    """Queue events again (pending, due now, attempts reset); running ones are left to their worker.

    An id of no event queues nothing at all: it is a typo, and the rest of the list may be one too."""
    with write_txn(store):
        if dead:
            ids = [row.id for row in Event.select(Event.id).where(Event.status == "dead").order_by(Event.id)]
        else:
            ids = list(dict.fromkeys(int(i) for i in event_ids))
        found = {row.id: row.status for row in Event.select(Event.id, Event.status).where(Event.id.in_(ids))} if ids else {}
        missing = [event_id for event_id in ids if event_id not in found]
        if missing:
            return ReplayResult([], {}, missing)
        skipped: dict[int, str] = {}
        queued: list[int] = []
        for event_id in ids:
            status = found[event_id]
            if status == "running":
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


