"""The one writer of the event table: check what a webhook would store, and store deliveries with
their events in one transaction (known deliveries only count a resend). The listener's writer
and reconciliation's queueing both store through ``store_deliveries``, so a stored event's
defaults (pending, due now, no attempts) are set here only. Also names why the store failed."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import peewee

from amohook.errors import StoreError
from amohook.store.models import Delivery, Event
from amohook.webhooks.parse import BodyRejected, ParsedWebhook

if TYPE_CHECKING:
    from amohook.store import Store

log = logging.getLogger("amohook.inbox")

# Headers worth keeping with a delivery (docs/amocrm.md §5 "Transport": amoCRM's agent and request id);
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
    """One delivery ready to be stored: a webhook request that passed the parser, or an entry of
    amoCRM's events log that reconciliation shaped like one (``source``, ``key``)."""

    body: bytes
    parsed: ParsedWebhook
    content_type: str | None = None
    headers: dict = field(default_factory=dict)
    remote_addr: str | None = None
    received_at: float = field(default_factory=time.time)
    key: str | None = None  # the duplicate key (64 hex characters); default: the body's SHA-256
    source: str | None = None  # where its events came from; None: a webhook

    @property
    def sha256(self) -> str:
        return self.key or hashlib.sha256(self.body).hexdigest()


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

    No backend takes a lone UTF-16 surrogate (JSON can write one as ``"\\ud800"``), and the
    event columns have fixed sizes; amoCRM sends none of these (its bodies are forms), so such a
    body is a bad request, not a reason to fail the batch it would join. Bytes that are not UTF-8
    and NUL are no reason: the parser replaces the first, ``store_in_txn`` the second where
    PostgreSQL's text could not hold it (a refusal counts toward amoCRM switching the webhook off).
    """
    if b"\\u" in body and b"\\ud" in body.lower():  # cheap test first: only JSON escapes make surrogates
        try:
            json.dumps(parsed.payload, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BodyRejected("a lone UTF-16 surrogate in a JSON string") from None
    values = [("account", parsed.account_subdomain), ("account_id", parsed.account_id)]
    for event in parsed.events:
        values += [("entity", event.entity), ("action", event.action), ("entity_id", event.entity_id)]
    for name, value in values:
        if value is not None and len(value) > _LIMITS[name]:
            raise BodyRejected(f"{name} longer than {_LIMITS[name]} characters")


def body_text(body: bytes) -> str:
    """The body for its text column: bytes that are not UTF-8 and NUL (which PostgreSQL's text
    refuses) as U+FFFD, as the parser read them. The dedup key is the hash of the bytes as sent."""
    text = bytes(body).decode("utf-8", "replace")
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _may_hold_nul(body: bytes) -> bool:
    """Whether a parsed value may hold NUL: a raw one, ``%00`` (form) or ``\\u0000`` (JSON)."""
    return b"\x00" in body or b"%00" in body or b"\\u0000" in body


def _same(value: str | None) -> str | None:
    return value


def _text(value: str | None) -> str | None:
    """A value for a short text column: NUL (a ``%00`` in an id) as U+FFFD, for PostgreSQL."""
    return value.replace("\x00", "\ufffd") if value is not None and "\x00" in value else value


def store_deliveries(store: Store, items: Sequence[Incoming]) -> list[Stored]:
    """Store deliveries and their events in ONE transaction; known bodies only count a resend."""
    if not items:
        return []
    try:
        with store.write():
            with driver_errors_as_peewee():  # as the ORM's own queries raise them
                return store_in_txn(store, items)
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
    (
        "disk full",
        (
            "database or disk is full",
            "no space left",
            "disk full",
            "is full",
            "could not extend file",
            "errno 28",
            "(1114",
            "(1021",
        ),
    ),
    ("database read-only", ("readonly database", "read-only", "read only")),
    ("database locked", ("database is locked", "lock wait timeout", "deadlock", "could not obtain lock")),
    ("too many database connections", ("too many connections", "too many clients", "remaining connection slots")),
    (
        "database unreachable",
        (
            "could not connect",
            "connection refused",
            "server closed the connection",
            "lost connection",
            "gone away",
            "can't connect",
            "connection to server",
            "terminating connection",
            "no route to host",
            "timed out",
            "(2003",
            "(2006",
            "(2013",
        ),
    ),
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


FAILURE_HINTS = {
    "disk full": "free space on the disk holding the store (or raise the database's size quota)",
    "database read-only": "the store or its directory is not writable by this user",
    "database locked": "another process holds the database's write lock too long",
    "too many database connections": "the database server is out of connection slots",
    "database unreachable": "check that the database server is up and reachable",
    "database file unusable": "check the disk and the store file",
}


def driver_errors_as_peewee():
    """Driver errors raised as peewee's (as the ORM's own queries raise them)."""
    return peewee.__exception_wrapper__  # type: ignore[attr-defined]  # peewee's own, undeclared in its types


_DELIVERY_COLUMNS = ("body_sha256", "body", "content_type", "headers", "remote_addr", "received_at", "times_received")
_EVENT_COLUMNS = (
    "delivery_id",
    "idx",
    "entity",
    "action",
    "entity_id",
    "account",
    "account_id",
    "data",
    "status",
    "attempts",
    "next_attempt_at",
    "received_at",
    "updated_at",
    "source",
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


def store_in_txn(store: Store, items: Sequence[Incoming]) -> list[Stored]:
    """The body of ``store_deliveries``, inside a transaction the caller holds."""
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
    for item, sha in zip(items, shas, strict=True):
        if sha in known or sha in fresh:
            continue
        fresh[sha] = item
        new_rows.append(
            (
                sha,
                body_text(item.body),
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
        clean = _text if _may_hold_nul(item.body) else _same
        account, account_id = clean(parsed.account_subdomain), clean(parsed.account_id)
        for idx, ev in enumerate(parsed.events):
            event_rows.append(
                (
                    ids[sha],
                    idx,
                    clean(ev.entity),
                    clean(ev.action),
                    clean(ev.entity_id),
                    account,
                    account_id,
                    _data_json(ev.data),
                    "pending",
                    0,
                    item.received_at,
                    item.received_at,
                    item.received_at,
                    item.source,
                )
            )
    _insert_many(cursor, event, _EVENT_COLUMNS, event_rows, q, p, lambda row: len(row[7]) + 256)

    results: list[Stored] = []
    resent: Counter = Counter()
    for item, sha in zip(items, shas, strict=True):
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
