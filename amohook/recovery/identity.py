"""One change, one effect: join the sightings of a lead change that arrive by different ways.

amoCRM may tell amohook about one stage change up to three ways: a webhook carrying the lead's
``last_modified`` (``leads[status]``, ``leads[update]``, resent on failure), a Digital Pipeline
hook carrying no time at all, and an entry in the events log (``GET /api/v4/events``) carrying
its own ``created_at``. Nothing documented links them (no shared id; whether ``last_modified``
equals ``created_at`` is not documented — amoCRM's docs: crm_platform/webhooks-format and
crm_platform/events-and-notes), so a change is identified by what it did — the lead, the stage
(or responsible user) it entered and the one it left — and when, within ``TOLERANCE`` seconds.

Sightings from the *same* source match only at the same time: two webhooks with different
``last_modified`` are two changes, however close. A sighting from another source joins the
nearest change within the tolerance that this source has not claimed yet. The corner this
leaves: the same lead moved A→B, B→A and A→B again within the tolerance, with some of the
deliveries lost, can be joined wrongly — in the worst case to one effect instead of two
(docs/reconciliation.md).

``identify`` runs under a per-lead lock, so two workers seeing the two sightings at the same
moment still agree on one change. The time of the first sighting (``key_at``) names the change
in action keys, so the rules' effects are keyed once whichever sighting came first.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from amohook.store.models import ChangeSeen

if TYPE_CHECKING:
    from amohook.store import Store

TOLERANCE = 10  # seconds between a webhook's last_modified and the log's created_at of one change
SOURCES = {"webhook": "hook_at", "untimed": "untimed_at", "events_log": "log_at"}


@dataclass(frozen=True)
class Sighting:
    """One report of a lead change: what it did, when (amoCRM's time, or the receipt time), and how."""

    account: str
    lead_id: int
    kind: str  # stage_changed, added, responsible_changed
    target: str
    origin: str | None
    at: int
    source: str  # a key of SOURCES


@dataclass(frozen=True)
class Identity:
    key_at: int  # names the change in action keys
    new: bool  # this sighting is the change's first
    first_source: str


def describe(change) -> tuple[str, str | None]:
    """The (target, origin) of a ``rules.LeadChange``: what it entered and, when known, what it left."""
    if change.kind == "stage_changed":
        origin = None if change.old_status_id is None else str(change.old_status_id)
        return f"{change.pipeline_id}:{change.status_id}", origin
    if change.kind == "responsible_changed":
        origin = None if change.old_responsible_user_id is None else str(change.old_responsible_user_id)
        return f"resp:{change.responsible_user_id}", origin
    return "added", None


def sighting_of(account: str, change, *, source: str | None, received_at: float) -> Sighting:
    """The sighting a queued event's change makes: from the log, a timed webhook, or an untimed one."""
    target, origin = describe(change)
    stamp = _int(change.changed_at)
    if source == "events_log" and stamp is not None:
        kind_of_source, at = "events_log", stamp
    elif stamp is not None:
        kind_of_source, at = "webhook", stamp
    else:
        kind_of_source, at = "untimed", int(received_at)
    return Sighting(account, change.lead_id, change.kind, target, origin, at, kind_of_source)


def _int(value) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _origins_agree(a: str | None, b: str | None) -> bool:
    return a is None or b is None or a == b


def _distance(row: ChangeSeen, at: int, own_column: str) -> float:
    """How far ``at`` is from the row's sightings by the other sources (inf when none)."""
    times = [getattr(row, col) for col in SOURCES.values() if col != own_column and getattr(row, col) is not None]
    return min((abs(t - at) for t in times), default=float("inf"))


def _match(rows: list[ChangeSeen], s: Sighting) -> tuple[ChangeSeen | None, bool]:
    """The row this sighting belongs to, and whether it is an exact repeat of the same source."""
    own = SOURCES[s.source]
    for row in rows:
        if getattr(row, own) == s.at and _origins_agree(row.origin, s.origin):
            return row, True
    near = [
        row
        for row in rows
        if getattr(row, own) is None and _origins_agree(row.origin, s.origin) and _distance(row, s.at, own) <= TOLERANCE
    ]
    if not near:
        return None, False
    return min(near, key=lambda row: (_distance(row, s.at, own), row.id)), False


def _candidates(s: Sighting) -> list[ChangeSeen]:
    return list(
        ChangeSeen.select()
        .where(
            (ChangeSeen.account == s.account)
            & (ChangeSeen.lead_id == s.lead_id)
            & (ChangeSeen.kind == s.kind)
            & (ChangeSeen.target == s.target)
        )
        .order_by(ChangeSeen.id)
    )


def is_known(s: Sighting) -> bool:
    """Would ``identify`` join this sighting to a change already seen? (A read; no lock.)"""
    return _match(_candidates(s), s)[0] is not None


def peek(s: Sighting) -> int:
    """The time that would name this sighting's change (``identify``'s ``key_at``), recording
    nothing: a preview's stand-in for ``identify``."""
    row = _match(_candidates(s), s)[0]
    return row.key_at if row is not None else s.at


def identify(store: Store, s: Sighting, clock=time.time) -> Identity:
    """Join ``s`` to the change it reports, recording it; the first sighting creates the change."""
    with lead_lock(store, s.account, s.lead_id):
        row, exact = _match(_candidates(s), s)
        own = SOURCES[s.source]
        if row is not None:
            if not exact:
                updates: dict[str, Any] = {own: s.at}
                if row.origin is None and s.origin is not None:
                    updates["origin"] = s.origin
                ChangeSeen.update(**updates).where(ChangeSeen.id == row.id).execute()
            return Identity(row.key_at, False, row.first_source)
        ChangeSeen.create(
            account=s.account,
            lead_id=s.lead_id,
            kind=s.kind,
            target=s.target,
            origin=s.origin,
            key_at=s.at,
            first_source=s.source,
            created_at=clock(),
            **{own: s.at},
        )
        return Identity(s.at, True, s.source)


@contextmanager
def lead_lock(store: Store, account: str, lead_id: int):
    """A write transaction that no other process runs for the same lead at the same time.

    SQLite's write transaction is already exclusive. PostgreSQL takes a transaction-scoped
    advisory lock; MySQL/MariaDB a named lock held around the transaction. Neither leaves rows
    behind, so the lock costs nothing to keep.
    """
    name = f"amohook:lead:{account}:{lead_id}"
    if store.is_postgres:
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        with store.write():
            store.db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (key,))
            yield
        return
    if store.is_mysql:
        short = "amohook:" + hashlib.sha256(name.encode()).hexdigest()[:40]  # MySQL names: 64 chars at most
        got = store.db.execute_sql("SELECT GET_LOCK(%s, 30)", (short,)).fetchone()[0]
        if got != 1:
            from amohook.errors import LockBusy

            raise LockBusy(f"waited 30 s for the lock on lead {lead_id} of '{account}'; try again")
        try:
            with store.write():
                yield
        finally:
            store.db.execute_sql("SELECT RELEASE_LOCK(%s)", (short,))
        return
    with store.write():
        yield


def connected_at(account: str, skew: float | None = None) -> float | None:
    """When the account was connected to this store, in amoCRM's time (None: no such account).

    ``init-auth`` creates the account row (a new grant for a known account keeps it), and the
    change registry that tells known changes apart arrived with schema version 3: the later of the
    two, turned into amoCRM's time by the clock skew seen at the last token answer (``skew``, this
    host's clock minus amoCRM's seen since, where none was stored).
    """
    from amohook.store.models import Account, SchemaVersion

    row = Account.get_or_none(Account.subdomain == account)
    if row is None:
        return None
    registry = SchemaVersion.get_or_none(SchemaVersion.version == 3)
    since = max(row.created_at or 0.0, registry.applied_at if registry is not None else 0.0)
    return since - (row.clock_skew if row.clock_skew is not None else (skew or 0.0))


def recovered_since(account: str, since: float) -> int:
    """Changes first seen in the events log (their webhook never came) since ``since``."""
    return (
        ChangeSeen.select()
        .where(
            (ChangeSeen.account == account)
            & (ChangeSeen.first_source == "events_log")
            & (ChangeSeen.created_at >= since)
        )
        .count()
    )


class ChangeJournal:
    """A worker handler that records every lead change an event reports (no rules needed).

    With handlers but no rules, this is what tells reconciliation which changes a webhook already
    brought, so the events log does not hand the handlers the same change again.
    """

    def __init__(self, store: Store):
        self.store = store

    def __call__(self, event, ctx) -> int:
        from amohook.rules import lead_changes

        if not event.account:
            return 0
        new = 0
        for change in lead_changes(event.entity, event.action, event.data):
            s = sighting_of(event.account, change, source=getattr(event, "source", None), received_at=event.received_at)
            new += identify(self.store, s).new
        return new
