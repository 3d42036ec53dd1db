"""Retention: what amohook deletes, when, and what it keeps so that effects stay exactly once.

Without it the store grows by about 2 KB per delivery for ever. Pruning deletes, in small
batches (each its own short transaction, so the listener's commits are never held up long):

- done events last changed more than ``keep`` ago, their attempts, and then deliveries that have
  no event left;
- dead events and their attempts after ``DEAD_KEEP`` (90 days), unless replayed before;
- but never an event with a failed action: replaying the event is how that action is retried
  (``doctor`` says so), so the event stays as long as the failed action (``DEAD_KEEP``);
- finished actions (done, rejected, skipped; failed ones after ``DEAD_KEEP``) and the change
  registry (``change_seen``) once they are older than ``EXACTLY_ONCE`` *and* than
  ``EXACTLY_ONCE`` before the oldest event still stored: a replay of any stored event, or a
  duplicate still to come, must find its change and its keys.

``EXACTLY_ONCE`` (8 days) is how long a duplicate of a change can still arrive: amoCRM's webhook
retries end after about 95 minutes, and reconciliation reads the events log at most
``--max-lookback`` (7 days) back plus its 10-minute overlap. Keys and the registry are kept at
least that long whatever ``keep`` says.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from peewee import fn

from amohook.errors import LockBusy
from amohook.runtime.loop import Periodic
from amohook.store import lease as leases
from amohook.store.models import Action, Attempt, ChangeSeen, Delivery, Event

if TYPE_CHECKING:
    from amohook.store import Store

log = logging.getLogger("amohook.retention")

DEFAULT_KEEP = 30 * 86400.0
DEAD_KEEP = 90 * 86400.0
EXACTLY_ONCE = 8 * 86400.0
MIN_KEEP = 86400.0  # a day: below that, amoCRM's own retries could outlive the delivery
MIN_KEEP_WHY = "amoCRM retries a webhook for ~95 minutes"
BATCH = 100
PRUNE_EVERY = 3600.0
LEASE = "prune"
LEASE_TTL = 1800.0  # a pruner that died blocks pruning for this long at most


@dataclass
class PruneResult:
    events: int = 0
    dead_events: int = 0
    deliveries: int = 0
    attempts: int = 0
    actions: int = 0
    changes: int = 0
    busy: bool = False
    dry_run: bool = False

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def total(self) -> int:
        return self.events + self.dead_events + self.deliveries + self.attempts + self.actions + self.changes


class PruneBusy(LockBusy):
    """Another process holds the prune lease: one prune at a time across the database."""


def _ids(query, batch: int) -> list[int]:
    return [row.id for row in query.limit(batch)]


def prune(
    store: Store,
    *,
    keep: float = DEFAULT_KEEP,
    dry_run: bool = False,
    batch: int = BATCH,
    pause: float | None = None,
    clock: Callable[[], float] = time.time,
    stop: threading.Event | None = None,
    before_delete: Callable[[list[int]], None] | None = None,
) -> PruneResult:
    """Delete what is older than the retention periods; ``dry_run`` counts instead.

    Every DELETE re-checks its condition in the statement itself: a batch's ids are read first,
    and on MySQL/PostgreSQL a replay may commit in between (``before_delete``, called with a
    batch's event ids inside its transaction, lets tests force that interleaving).

    Between batches the pruner steps aside for at least ``pause`` seconds and twice as long as
    the batch took, so it holds the database at most a third of the time: on SQLite the
    listener's commit waits in SQLite's busy handler, which sleeps in steps of up to 100 ms and
    would keep missing a pruner that takes the lock back at once. ``pause=None``: 0.1 s on SQLite,
    0.01 s elsewhere (row locks there do not hold up new inserts).
    """
    keep = max(float(keep), MIN_KEEP)
    if pause is None:
        pause = 0.1 if store.is_sqlite else 0.01
    now = clock()
    result = PruneResult(dry_run=dry_run)
    done_before, dead_before = now - keep, now - DEAD_KEEP
    keys_before = now - max(keep, EXACTLY_ONCE)
    # An event with a failed action stays: replaying it is the only way to retry that action.
    failed_action = Action.select(Action.id).where((Action.event_id == Event.id) & (Action.status == "failed"))
    old_done = (Event.status == "done") & (Event.updated_at < done_before) & ~fn.EXISTS(failed_action)
    old_dead = (Event.status == "dead") & (Event.updated_at < dead_before) & ~fn.EXISTS(failed_action)

    def keys_cut() -> float:
        """Keys and change records older than this cannot belong to a change any stored event (or a
        duplicate still to come) reports: a stored event's change is at most ``EXACTLY_ONCE`` older
        than its receipt (webhook retries, the events log's look-back), and replaying it must find them."""
        oldest = Event.select(fn.MIN(Event.received_at)).scalar()
        return min(keys_before, float("inf") if oldest is None else oldest - EXACTLY_ONCE)

    def finished(cut: float):
        return (Action.status.in_(["done", "rejected", "skipped"]) & (Action.created_at < cut)) | (
            (Action.status == "failed") & (Action.updated_at < dead_before) & (Action.created_at < cut)
        )

    if dry_run:
        result.events = Event.select().where(old_done).count()
        result.dead_events = Event.select().where(old_dead).count()
        result.attempts = (
            Attempt.select().join(Event, on=(Attempt.event_id == Event.id)).where(old_done | old_dead).count()
        )
        result.deliveries = _prunable_deliveries_count(old_done | old_dead)
        left = Event.select(fn.MIN(Event.received_at)).where(~(old_done | old_dead)).scalar()
        cut = min(keys_before, float("inf") if left is None else left - EXACTLY_ONCE)
        result.actions = Action.select().where(finished(cut)).count()
        result.changes = ChangeSeen.select().where(ChangeSeen.created_at < cut).count()
        return result

    def stopped() -> bool:
        return stop is not None and stop.is_set()

    def step_aside(started: float) -> None:
        if pause:
            time.sleep(max(pause, 2 * (time.monotonic() - started)))

    for condition, field in ((old_done, "events"), (old_dead, "dead_events")):
        while not stopped():
            started = time.monotonic()
            with store.write():
                ids = _ids(Event.select(Event.id).where(condition).order_by(Event.updated_at), batch)
                if not ids:
                    break
                deliveries = {row.delivery_id for row in Event.select(Event.delivery_id).where(Event.id.in_(ids))}
                if before_delete is not None:
                    before_delete(ids)
                # The condition again, in the DELETE itself: an event replayed since it was read
                # (pending again) is not deleted, nor are its attempts and delivery.
                deleted = Event.delete().where(Event.id.in_(ids) & condition).execute()
                setattr(result, field, getattr(result, field) + deleted)
                left = Event.select(Event.id).where(Event.id.in_(ids))
                result.attempts += (
                    Attempt.delete().where(Attempt.event_id.in_(ids) & Attempt.event_id.not_in(left)).execute()
                )
                still_used = {
                    row.delivery_id
                    for row in Event.select(Event.delivery_id).where(Event.delivery_id.in_(list(deliveries)))
                }
                gone = list(deliveries - still_used)
                if gone:
                    result.deliveries += Delivery.delete().where(Delivery.id.in_(gone)).execute()
            step_aside(started)
    cut = keys_cut()
    while not stopped():
        started = time.monotonic()
        with store.write():
            doomed = _ids(Action.select(Action.id).where(finished(cut)).order_by(Action.id), batch)
            if not doomed:
                break
            # Re-checked: a replay may have brought a failed action back since it was read.
            result.actions += Action.delete().where(Action.id.in_(doomed) & finished(cut)).execute()
        step_aside(started)
    while not stopped():
        started = time.monotonic()
        with store.write():
            ids = _ids(
                ChangeSeen.select(ChangeSeen.id).where(ChangeSeen.created_at < cut).order_by(ChangeSeen.id), batch
            )
            if not ids:
                break
            result.changes += (
                ChangeSeen.delete().where(ChangeSeen.id.in_(ids) & (ChangeSeen.created_at < cut)).execute()
            )
        step_aside(started)
    return result


def _prunable_deliveries_count(condition) -> int:
    kept = Event.select(Event.delivery_id).where(~condition)
    doomed = Event.select(Event.delivery_id).where(condition)
    return (
        Delivery.select(fn.COUNT(Delivery.id)).where(Delivery.id.in_(doomed) & Delivery.id.not_in(kept)).scalar() or 0
    )


def prune_once(
    store: Store, keep: float, *, stop: threading.Event | None = None, pause: float | None = None
) -> PruneResult:
    """One pruning run under the cross-process lease; a busy lease means another process prunes."""
    owner = leases.new_owner()
    if not leases.try_acquire(LEASE, owner, LEASE_TTL):
        return PruneResult(busy=True)
    try:
        return prune(store, keep=keep, stop=stop, pause=pause)
    finally:
        leases.release(LEASE, owner)


def prune_by_hand(store: Store, keep: float, *, dry_run: bool = False) -> PruneResult:
    """`amohook prune`: the same lease as the background pruner, so one prune runs at a time;
    ``PruneBusy`` names the holder and when its lease runs out. A dry run only counts: no lease."""
    if dry_run:
        return prune(store, keep=keep, dry_run=True)
    owner = leases.new_owner()
    if not leases.try_acquire(LEASE, owner, LEASE_TTL):
        raise PruneBusy(f"{leases.describe_busy(LEASE, 'pruning')} — try again later")
    try:
        return prune(store, keep=keep)
    finally:
        leases.release(LEASE, owner)


def pruner(store: Store, keep: float, every: float = PRUNE_EVERY, first_after: float = 60.0) -> Periodic:
    """The background pruning of `serve` and `worker`: a minute after start, then every hour."""

    def step(stop: threading.Event) -> None:
        result = prune_once(store, keep, stop=stop)
        if result.total:
            log.info(
                "pruned %d event(s), %d dead event(s), %d deliveries, %d attempt(s), %d action(s), %d change record(s)",
                result.events,
                result.dead_events,
                result.deliveries,
                result.attempts,
                result.actions,
                result.changes,
            )

    return Periodic("prune", step, every, first_after=first_after, store=store, logger=log)
