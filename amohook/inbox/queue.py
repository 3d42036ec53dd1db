"""The event queue the workers share: claim, complete, fail, release, renew, and replay."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from amohook.inbox.receive import ERROR_MAX
from amohook.store.models import Attempt, Event

if TYPE_CHECKING:
    from amohook.store import Store


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


def due_condition(now: float):
    """The condition of an event a worker may claim now: pending and due, or its lease expired."""
    return ((Event.status == "pending") & (Event.next_attempt_at <= now)) | (
        (Event.status == "running") & (Event.lease_until < now)
    )


def claim(
    store: Store,
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
    every worker cannot loop forever. SQLite: ``store.write()`` (BEGIN IMMEDIATE) serialises claimers;
    MySQL/PostgreSQL: FOR UPDATE SKIP LOCKED lets claimers pass each other's rows.
    """
    with store.write():
        query = (
            Event.select(Event.id, Event.status, Event.attempts, Event.updated_at, Event.lease_owner)
            .where(due_condition(now))
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


def complete(store: Store, event_id: int, owner: str, *, started_at: float, now: float) -> bool:
    """Mark done if the lease is still ``owner``'s; record the attempt either way."""
    with store.write():
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
    store: Store,
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
    with store.write():
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
        Attempt.create(
            event_id=event_id, worker=owner, started_at=started_at, finished_at=now, outcome=outcome, error=error
        )
    return bool(won)


def release(store: Store, event_ids: Sequence[int], owner: str, *, now: float) -> int:
    """Give back claimed events that were never started: pending again, due at once, no attempt."""
    if not event_ids:
        return 0
    with store.write():
        return (
            Event.update(status="pending", lease_owner=None, lease_until=None, next_attempt_at=now, updated_at=now)
            .where(Event.id.in_(list(event_ids)) & (Event.lease_owner == owner) & (Event.status == "running"))
            .execute()
        )


def renew(store: Store, event_ids: Sequence[int], owner: str, *, lease_seconds: float, now: float) -> int:
    """Extend the lease on events ``owner`` still holds; returns how many it still holds."""
    if not event_ids:
        return 0
    with store.write():
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


def replay(store: Store, event_ids: Sequence[int] = (), *, dead: bool = False, now: float) -> ReplayResult:
    """Queue events again (pending, due now, attempts reset); running ones are left to their worker.

    An id of no event queues nothing at all: it is a typo, and the rest of the list may be one too."""
    with store.write():
        if dead:
            ids = [row.id for row in Event.select(Event.id).where(Event.status == "dead").order_by(Event.id)]
        else:
            ids = list(dict.fromkeys(int(i) for i in event_ids))
        found = (
            {row.id: row.status for row in Event.select(Event.id, Event.status).where(Event.id.in_(ids))} if ids else {}
        )
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
