"""What an operator reads about the queue: counts, listings and one event's story."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import peewee

from amohook.inbox.queue import due_condition
from amohook.store.models import Action, Attempt, Delivery, Event

if TYPE_CHECKING:
    from amohook.store import Store


@dataclass(frozen=True)
class QueueStats:
    pending: int
    due: int
    running: int
    dead: int
    oldest_pending_age: float | None  # seconds since the oldest pending event was received


def queue_stats(store: Store, *, now: float) -> QueueStats:
    """Counts by status (done is not counted: it only grows) and the age of the oldest pending."""
    counts: dict[str, int] = dict(
        Event.select(Event.status, peewee.fn.COUNT(Event.id))  # type: ignore[arg-type]  # rows are tuples, not models
        .where(Event.status.in_(["pending", "running", "dead"]))
        .group_by(Event.status)
        .tuples()
    )
    due = Event.select().where(due_condition(now)).count()
    oldest = Event.select(peewee.fn.MIN(Event.received_at)).where(Event.status == "pending").scalar()
    return QueueStats(
        pending=int(counts.get("pending", 0)),
        due=int(due),
        running=int(counts.get("running", 0)),
        dead=int(counts.get("dead", 0)),
        oldest_pending_age=None if oldest is None else max(0.0, now - float(oldest)),
    )


def list_events(store: Store, *, status: str | None = None, entity: str | None = None, limit: int = 50) -> list[Event]:
    """Newest first."""
    query = Event.select()
    if status:
        query = query.where(Event.status == status)
    if entity:
        query = query.where(Event.entity == entity)
    return list(query.order_by(Event.id.desc()).limit(limit))


def went_dead(store: Store, *, since: float) -> list[int]:
    """Events that went dead at ``since`` or later (`worker --once` exits non-zero for them)."""
    query = Event.select(Event.id).where((Event.status == "dead") & (Event.updated_at >= since))
    return [row.id for row in query.order_by(Event.id)]


@dataclass(frozen=True)
class EventDetail:
    event: Event
    delivery: Delivery | None
    attempts: list[Attempt]
    actions: list[Action] = field(default_factory=list)  # what the rules recorded for it


def event_detail(store: Store, event_id: int) -> EventDetail | None:
    """One event with its delivery, its attempts and its actions; None when there is no such event."""
    event = Event.get_or_none(Event.id == event_id)
    if event is None:
        return None
    delivery = Delivery.get_or_none(Delivery.id == event.delivery_id)
    attempts = list(Attempt.select().where(Attempt.event_id == event_id).order_by(Attempt.started_at, Attempt.id))
    actions = list(Action.select().where(Action.event_id == event_id).order_by(Action.id))
    return EventDetail(event, delivery, attempts, actions)
