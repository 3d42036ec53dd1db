"""What the status page and /metrics show from the store, read by one thread and kept a few seconds.

Both are polled (a browser tab refreshes every 30 s, Prometheus scrapes every 15 s, several
admins may look at once), so neither reads the database per request: like /healthz
(``health.QueueWatch``), one thread of its own reads a ``Snapshot`` on its own connection when
someone asks and the last one is older than ``FRESH_SECONDS``; every request in between gets the
same one. Every read is bounded (a LIMIT on rows, counts on indexed columns), and nothing here
calls amoCRM: the token state is what the store holds (``tokens.token_status``), not a live check
(``amohook doctor`` makes that one call per account).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import peewee

from amohook import inbox
from amohook.actions.registry import created_kinds, kinds
from amohook.ops import doctor
from amohook.ops.reader import OnDemandReader, Unreadable
from amohook.store.models import Account, Action, Event

if TYPE_CHECKING:  # for the annotations only: overview must stay cheap to import
    from amohook.recovery.reconcile import AccountReconcileStatus
    from amohook.store import Store
    from amohook.tokens import TokenStatus

log = logging.getLogger("amohook.server")

FRESH_SECONDS = 3.0  # a snapshot younger than this is shown as it is
WAIT_SECONDS = 5.0  # how long a request waits for a new read before answering with what there is
MAX_ACCOUNTS = 50
RECENT_EVENTS = 50
DEAD_EVENTS = 50
TODAY_ACTIONS = 200
DATA_PREFIX = 16 * 1024  # the part of an event's data read to find the entity's name
EVENT_STATUSES = ("pending", "running", "done", "dead")
ACTION_STATUSES = ("pending", "sending", "done", "failed")


@dataclass(frozen=True)
class AccountView:
    subdomain: str
    token: TokenStatus
    checks: list[doctor.Check]  # the refresh token, subscriptions, reconciliation
    reconcile: AccountReconcileStatus


@dataclass(frozen=True)
class EventRow:
    id: int
    received_at: float
    updated_at: float
    account: str | None
    entity: str
    action: str
    entity_id: str | None
    name: str | None  # the entity's name as amoCRM sent it (outside text)
    status: str
    attempts: int
    last_error: str | None
    source: str


@dataclass(frozen=True)
class ActionRow:
    id: int
    updated_at: float
    account: str
    rule: str
    kind: str
    result_id: int | None
    event_id: int | None
    entity_id: int | None
    text: str


@dataclass(frozen=True)
class Snapshot:
    """Everything the page and /metrics show from the store, as of ``read_at`` (Unix time)."""

    read_at: float
    checks: list  # doctor.Check, store-only ones
    accounts: list[AccountView]
    accounts_total: int
    queue: inbox.QueueStats
    events_by_status: dict[str, int]
    actions_by_status: dict[str, int]
    recent: list[EventRow]
    dead: list[EventRow]
    today: list[ActionRow]
    today_total: int
    today_since: float


def read_snapshot(store: Store, now: float) -> Snapshot:
    """Read everything once (a few dozen bounded queries; one more per account)."""
    from amohook.recovery.reconcile import reconcile_status
    from amohook.tokens import refresh_holder, token_status

    database = doctor.check_database(store)
    if not database.ok:
        raise Unreadable(database.detail)  # answered, but not a store this amohook can read
    checks = [database]
    accounts_total = Account.select().count()
    accounts = []
    for account in Account.select().order_by(Account.subdomain).limit(MAX_ACCOUNTS):
        sub = account.subdomain
        token = token_status(account, now, refresh_holder(account))
        own = [doctor.check_refresh_token(account, now)]
        own += [c for c in (doctor.check_subscriptions(sub, now), doctor.check_reconciliation(sub, now)) if c]
        accounts.append(AccountView(sub, token, own, reconcile_status(sub, now)))
    if not accounts_total:
        checks.append(
            doctor.Check(
                "accounts", False, "error", "no account in the store", "run `amohook init-auth` to connect one"
            )
        )
    checks += [doctor.check_dead_events(), doctor.check_pending_events(now), doctor.check_failed_actions()]
    if store.sqlite_path is not None:  # an SQLite store
        checks.append(doctor.check_disk(store.sqlite_path))
    since = _local_midnight(now)
    return Snapshot(
        read_at=now,
        checks=checks,
        accounts=accounts,
        accounts_total=accounts_total,
        queue=inbox.queue_stats(store, now=now),
        events_by_status=_counts_by_status(Event, EVENT_STATUSES),
        actions_by_status=_counts_by_status(Action, ACTION_STATUSES),
        recent=_events(None, RECENT_EVENTS),
        dead=_events("dead", DEAD_EVENTS),
        today=_today(since, TODAY_ACTIONS),
        today_total=_today_query(since).count(),
        today_since=since,
    )


def _counts_by_status(model, statuses: tuple[str, ...]) -> dict[str, int]:
    counts = dict(model.select(model.status, peewee.fn.COUNT(model.id)).group_by(model.status).tuples())
    return {status: int(counts.get(status, 0)) for status in statuses} | {
        str(k): int(v) for k, v in counts.items() if k not in statuses
    }


def _local_midnight(now: float) -> float:
    """Today's start in this host's time zone: "created today" means what the admin's clock says."""
    t = time.localtime(now)
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, -1))


def _events(status: str | None, limit: int) -> list[EventRow]:
    # Not the whole data (up to a webhook body's 1 MiB): its beginning, where amoCRM puts the name.
    prefix = peewee.fn.SUBSTR(Event.data, 1, DATA_PREFIX).alias("prefix")
    query = Event.select(
        Event.id,
        Event.received_at,
        Event.updated_at,
        Event.account,
        Event.entity,
        Event.action,
        Event.entity_id,
        Event.status,
        Event.attempts,
        Event.last_error,
        Event.source,
        prefix,
    )
    if status is not None:
        query = query.where(Event.status == status).order_by(Event.updated_at.desc())
    else:
        query = query.order_by(Event.id.desc())
    return [
        EventRow(
            id=e.id,
            received_at=e.received_at,
            updated_at=e.updated_at,
            account=e.account,
            entity=e.entity,
            action=e.action,
            entity_id=e.entity_id,
            name=_name(e.prefix),  # type: ignore[attr-defined]  # the column selected as "prefix"
            status=e.status,
            attempts=e.attempts,
            last_error=e.last_error,
            source=e.source or "webhook",
        )
        for e in query.limit(limit)
    ]


def _name(data: str | None) -> str | None:
    try:
        value = json.loads(data or "")
    except ValueError:
        return None  # cut short by the prefix, or not JSON: no name shown
    name = value.get("name") if isinstance(value, dict) else None
    return str(name) if name not in (None, "") else None


def _today_query(since: float):
    return Action.select().where(
        (Action.status == "done") & (Action.kind.in_(created_kinds())) & (Action.updated_at >= since)
    )


def _today(since: float, limit: int) -> list[ActionRow]:
    rows = []
    for a in _today_query(since).order_by(Action.updated_at.desc()).limit(limit):
        try:
            payload = json.loads(a.payload or "{}")
        except ValueError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        kind = kinds().get(a.kind)
        entity, text = kind.shown(payload) if kind else (None, "")
        rows.append(
            ActionRow(
                id=a.id,
                updated_at=a.updated_at,
                account=a.account,
                rule=a.rule,
                kind=a.kind,
                result_id=a.result_id,
                event_id=a.event_id,
                entity_id=entity,
                text=text,
            )
        )
    return rows


class OverviewReader:
    """Reads ``Snapshot``s on one thread and one connection; shared by every request
    (``reader.OnDemandReader``: at most once per ``fresh`` seconds, only when asked)."""

    def __init__(self, store: Store, *, fresh: float = FRESH_SECONDS, wait: float = WAIT_SECONDS, clock=time.time):
        self.store = store
        self.clock = clock
        self.reader: OnDemandReader[Snapshot] = OnDemandReader(
            store,
            lambda: read_snapshot(self.store, self.clock()),
            name="amohook-overview",
            what="status page",
            fresh=fresh,
            wait=wait,
            logger=log,
        )

    @property
    def reads(self) -> int:
        return self.reader.reads  # tests check the caching with it

    @property
    def fresh(self) -> float:
        return self.reader.fresh

    @fresh.setter
    def fresh(self, seconds: float) -> None:
        self.reader.fresh = seconds

    def start(self) -> OverviewReader:
        self.reader.start()
        return self

    def stop(self) -> None:
        self.reader.stop(1.0)

    def get(self) -> tuple[Snapshot | None, str | None]:
        """(the latest snapshot or None, why the last read failed or None); reads anew when stale."""
        snapshot, error, _ = self.reader.get()
        return snapshot, error
