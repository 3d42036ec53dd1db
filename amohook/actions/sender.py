"""Carrying out what rules planned: exactly once, and in batches — whatever the kind of action.

The sender owns the protocol's bookkeeping (claims, leases, outcomes, backoff); each kind
(``amohook.actions.kinds()``) says how its batch is sent and how an action that may already have
happened is recognised. For the kinds that create something (tasks, notes) the protocol is:
1. The rule's plan is recorded as an ``Action`` row under its deterministic key (insert-or-ignore),
   in the same breath as the event is handled: duplicates, re-sends and replays of the same change
   find the key taken and add nothing.
2. A sender claims up to ``batch_size`` pending actions of one account and marks them ``sending``
   — committed *before* the request — then sends them as one ``POST /api/v4/tasks`` with each
   action's ``request_id``, and records each task id.
3. An action found ``sending`` with an expired lease, or whose request got no clear answer
   (timeout, dropped connection, 5xx), may already exist in amoCRM. Before sending it again, the
   sender looks for it (``GET /api/v4/tasks`` by lead, matching text, due time, type and
   responsible — all fixed when the action was recorded) and adopts the task it finds.

When amoCRM rejects a batch because one item is invalid (400 ``validation-errors``), the
invalid items are marked ``rejected``; the rest are looked up before they are sent again (the
fake and, as far as we know, amoCRM create nothing then — but that is not documented).

An action goes back from ``sending`` to ``pending`` only on a definite answer that nothing was
created: a 4xx (including 429) to its POST, or a lookup that completed and did not find it. Any
other failure keeps it ``sending``, so the next attempt looks first.

Each lane (``ActionKind.lane``: amoCRM's kinds, and notify's receivers) has a sender of its own
with its own thread (``lanes``, ``run``, ``drain``): a receiver that answers slowly holds up its
own lane only. The claims and leases are the same for all, so exactly-once holds across lanes as
it does across processes.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import requests

from amohook.actions.registry import kinds
from amohook.errors import (
    AmohookError,
    AmoTemporaryError,
    RefusedBeforeRefresh,
    needs_person,
)
from amohook.retry import ACTIONS_POLICY, RetryPolicy, decide
from amohook.settings import LEASE_SECONDS, MAX_ATTEMPTS
from amohook.store.lease import new_owner
from amohook.store.models import Action

if TYPE_CHECKING:
    from amohook.amocrm.client import AmoClient
    from amohook.store import Store

BATCH_SIZE = 50  # a conservative batch: amoCRM's documented batch caps are 50 (complex leads)
# Longer than one POST can take (connect 5 s + read 20 s, plus the rate limiter). The lease is
# re-asserted right before each POST, and a POST refused with 401 is not repeated inside it: the
# refresh may wait minutes for its own lease, after which this sender may no longer own the work.
# The action's lease is settings.LEASE_SECONDS; MAX_ATTEMPTS (settings): backoff from 30 s doubling,
# capped at 1 h, jittered: 1.5 to 3 hours of amoCRM trouble.
HTTP_DEADLINE = 30.0  # the longest one request to a server other than amoCRM (notify) may take
DEFAULT_LANE = "amocrm"  # the lane of every kind that does not name another, and of unknown kinds
# One INFO line per action carried out (rule, lead, kind, what amoCRM made or changed): routine,
# so never above INFO; what needs a person goes through ``log`` (WARNING).
effects = logging.getLogger("amohook.actions")


def record_planned(
    store: Store,
    planned: Iterable,
    event_id: int | None,
    clock: Callable[[], float] = time.time,
    *,
    look_first: bool = False,
) -> int:
    """Record planned actions under their keys; returns how many were new (the rest were duplicates).

    An action carrying a ``skip_reason`` (the loop guard) is recorded as ``skipped``, never sent.
    The lead an action changes is kept in ``result_id`` from the start (the guard counts them).
    ``look_first``: the change may have been acted on already (it came only from the events log,
    or it is a stale lead's stay another store may have found too):
    the action starts as one whose answer was lost — ``sending`` with an expired lease — so the
    sender looks it up in amoCRM (``recognise``) before it sends anything.
    """
    rows = [
        dict(
            key=p.key,
            account=p.account,
            rule=p.rule[:255],
            event_id=event_id,
            kind=p.kind,
            payload=json.dumps(p.payload, ensure_ascii=False, sort_keys=True),
            status="skipped" if getattr(p, "skip_reason", None) else ("sending" if look_first else "pending"),
            lease_until=0 if look_first else None,
            last_error=getattr(p, "skip_reason", None),
            result_id=getattr(p, "target_id", None),
            created_at=clock(),
            updated_at=clock(),
        )
        for p in planned
    ]
    if not rows:
        return 0
    keys = [row["key"] for row in rows]
    with store.write():
        existing = {a.key for a in Action.select(Action.key).where(Action.key.in_(keys))}
        # An action that gave up (amoCRM down for long) comes back when its event is replayed; it
        # may have reached amoCRM, so it returns as "sending" with an expired lease: looked up first.
        Action.update(status="sending", attempts=0, lease_owner=None, lease_until=0, updated_at=clock()).where(
            Action.key.in_(keys) & (Action.status == "failed")
        ).execute()
        fresh = [row for row in rows if row["key"] not in existing]
        for row in fresh:
            # A racing process may insert the same key between our read and this insert:
            # the unique key and ON CONFLICT DO NOTHING keep it to one row either way.
            Action.insert(**row).on_conflict_ignore().execute()
    return len(fresh)


def _lead_of(action: Action) -> str:
    """The lead an action is for: from its payload (tasks, notes, lead changes), else its event."""
    try:
        payload = json.loads(action.payload)
        lead = payload.get("entity_id") or (payload.get("patch") or {}).get("id")
    except (ValueError, AttributeError):
        lead = None
    if lead is None and action.event_id is not None:
        from amohook.store.models import Event

        row = Event.get_or_none(Event.id == action.event_id)
        lead = row.entity_id if row is not None else None
    return "?" if lead is None else str(lead)


@dataclass
class SendStats:
    posts: int = 0
    lookups: int = 0
    created: int = 0
    adopted: int = 0
    failed: int = 0
    retried: int = 0
    skipped: int = 0
    answer_bytes: int = 0  # read of the answers of servers other than amoCRM (notify)
    errors: list = field(default_factory=list)

    def __add__(self, other: SendStats) -> SendStats:
        total = SendStats(errors=self.errors + other.errors)
        for name in ("posts", "lookups", "created", "adopted", "failed", "retried", "skipped", "answer_bytes"):
            setattr(total, name, getattr(self, name) + getattr(other, name))
        return total


def lane_names() -> list[str]:
    """Every lane, the default one first."""
    return [DEFAULT_LANE, *sorted({k.lane for k in kinds().values()} - {DEFAULT_LANE})]


class _Unspecified(Exception):
    """The failure ``later`` was given no exception for: an ordinary one (the backoff, an attempt)."""


class ActionSender:
    """Claims pending actions and sends them in batches; safe to run in many threads and processes."""

    name = "actions"

    def __init__(
        self,
        store: Store,
        client_for: Callable[[str], AmoClient],
        *,
        owner: str | None = None,
        batch_size: int = BATCH_SIZE,
        lease_seconds: float = LEASE_SECONDS,
        max_attempts: int = MAX_ATTEMPTS,
        policy: RetryPolicy = ACTIONS_POLICY,
        clock: Callable[[], float] = time.time,
        log: Callable[[str], None] | None = None,
        linger: float = 0.3,
        env: Mapping[str, str] | None = None,
        http=None,
        http_deadline: float = HTTP_DEADLINE,
        lane: str | None = None,
    ):
        """``env``: where ``notify`` reads its URLs (default: this process's environment);
        ``http``: the ``requests.Session`` it posts them with (made to obey ``http_deadline``, the
        most one such request may take, whole); ``lane``: send only that lane's kinds (None: all,
        each lane in its own thread)."""
        from amohook.actions.deadline import with_deadline

        self.store = store
        self.client_for = client_for
        self.owner = owner or new_owner()
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.policy = replace(policy, max_attempts=max_attempts)
        self.clock = clock
        self.log = log or (lambda message: None)
        self.linger = linger
        self._stats = SendStats()
        self.env = env if env is not None else os.environ
        self.http = with_deadline(http or requests.Session())
        self.http_deadline = http_deadline
        self.resting: dict[str, float] = {}  # servers other than amoCRM that gave no answer: until when they rest
        self.lane = lane
        self._lanes: list[ActionSender] | None = None
        self.wakeup = threading.Event()
        self._last_flush = float("-inf")  # monotonic time of the last batch claimed
        self._batch: dict[int, Action] = {}  # the claimed batch by id: what ``done`` says in its log line

    # -- lanes ---------------------------------------------------------------------------------
    @property
    def stats(self) -> SendStats:
        """What this sender did, its lanes' included."""
        total = self._stats
        for sender in self._lanes or []:
            total = total + sender._stats
        return total

    def lanes(self) -> list[ActionSender]:
        """The senders that carry the actions, one per lane (made once; just this one if it has a lane)."""
        if self.lane is not None:
            return [self]
        if self._lanes is None:
            self._lanes = [self._for_lane(name) for name in lane_names()]
        return self._lanes

    def _for_lane(self, lane: str) -> ActionSender:
        sender = copy.copy(self)
        sender.lane, sender._lanes, sender._stats = lane, None, SendStats()
        sender.wakeup = threading.Event()
        sender._last_flush = float("-inf")
        if all(k.batch_size <= 1 for k in kinds().values() if k.lane == lane):
            sender.linger = 0.0  # one action per request: there is no batch to wait for
        return sender

    def wake(self) -> None:
        """New actions were recorded: every lane looks now."""
        self.wakeup.set()
        for sender in self._lanes or []:
            sender.wakeup.set()

    def _in_lane(self):
        """The condition on ``Action.kind`` for this sender's lane (None: every kind)."""
        if self.lane is None:
            return None
        if self.lane == DEFAULT_LANE:  # with the kinds it does not know: they are failed there
            others = [name for name, kind in kinds().items() if kind.lane != self.lane]
            return Action.kind.not_in(others) if others else None
        return Action.kind.in_([name for name, kind in kinds().items() if kind.lane == self.lane])

    # -- claiming ------------------------------------------------------------------------------
    def claim(self) -> tuple[list[Action], set[int]]:
        """Up to one batch of due actions of one account, marked ``sending`` and leased to us.

        Returns the actions and the ids of those that may already have reached amoCRM.
        """
        now = self.clock()
        due = ((Action.status == "pending") & (Action.lease_until.is_null() | (Action.lease_until <= now))) | (
            (Action.status == "sending") & (Action.lease_until < now)
        )
        lane = self._in_lane()
        if lane is not None:
            due = due & lane
        with self.store.write():
            first = self.store.for_update(
                Action.select(Action.id, Action.account, Action.kind).where(due).order_by(Action.id).limit(1),
                skip_locked=True,
            ).first()
            if first is None:
                return [], set()
            kind = kinds().get(first.kind)
            limit = min(self.batch_size, kind.batch_size) if kind else 1
            query = (
                Action.select()
                .where(due & (Action.account == first.account) & (Action.kind == first.kind))
                .order_by(Action.id)
                .limit(limit)
            )
            actions = list(self.store.for_update(query, skip_locked=True))
            if not actions:
                return [], set()
            maybe_sent = {a.id for a in actions if a.status == "sending"}
            Action.update(
                status="sending", lease_owner=self.owner, lease_until=now + self.lease_seconds, updated_at=now
            ).where(Action.id.in_([a.id for a in actions])).execute()
        return actions, maybe_sent

    # -- outcomes ------------------------------------------------------------------------------
    def _mine(self, ids):
        return Action.id.in_(list(ids)) & (Action.lease_owner == self.owner)

    def done(self, action_id: int, result_id: int | None, note: str | None = None) -> None:
        """Settled: ``result_id`` is what it created (or the lead it changed); ``note`` says how.

        Logs the one INFO line of the action: rule, lead, kind and amoCRM's id.
        """
        changed = (
            Action.update(
                status="done",
                result_id=result_id,
                lease_owner=None,
                lease_until=None,
                last_error=note,
                updated_at=self.clock(),
            )
            .where(self._mine([action_id]))
            .execute()
        )
        action = self._batch.get(action_id)
        if changed and action is not None and effects.isEnabledFor(logging.INFO):
            effects.info(
                "rule %r, lead %s: %s done, amoCRM id %s%s",
                action.rule,
                _lead_of(action),
                action.kind,
                "—" if result_id is None else result_id,
                f" ({note})" if note else "",
            )

    def skip(self, ids, note: str) -> None:
        """Settled without an effect, on purpose (the lead moved on; the loop guard); ``note`` says why."""
        self.fail(ids, note, status="skipped")

    def fail(self, ids, error: str, status: str = "failed", **fields) -> None:
        """``failed``: gave up (an event replay revives it); ``rejected``: amoCRM refused the action itself.

        One line per action: WARNING (a person must look) when it failed or was rejected, INFO when
        it was skipped on purpose.
        """
        ids = list(ids)
        changed = (
            Action.update(
                status=status,
                lease_owner=None,
                lease_until=None,
                last_error=error[:2000],
                updated_at=self.clock(),
                **fields,
            )
            .where(self._mine(ids))
            .execute()
        )
        level = logging.INFO if status == "skipped" else logging.WARNING
        if not changed or not effects.isEnabledFor(level):
            return
        for action_id in ids:
            action = self._batch.get(action_id)
            if action is None:
                effects.log(level, "action %s %s: %s", action_id, status, error[:300])
            else:
                effects.log(
                    level,
                    "rule %r, lead %s: %s %s: %s",
                    action.rule,
                    _lead_of(action),
                    action.kind,
                    status,
                    error[:300],
                )

    def later(
        self,
        actions: list[Action],
        error: str,
        *,
        maybe_sent: bool,
        wait: float | None = None,
        counts: bool = True,
        failure: BaseException | None = None,
    ) -> None:
        """Back off; an action whose request may have landed stays ``sending`` so it is looked up first.

        ``failure``: the exception, whose wait and count ``retry.decide`` sets per action (else
        ``wait``, or the backoff). ``counts=False``: not an attempt whatever the failure (waiting
        for amoCRM's rate limit or for a person; a batch held up by another action's lookup).
        """
        now = self.clock()
        with self.store.write():  # one commit for the batch, not one per action
            for a in actions:
                decision = decide(failure or _Unspecified(), a.attempts + 1, self.policy, random.random())
                counted = counts and decision.counts
                attempts = a.attempts + (1 if counted else 0)
                if counted and decision.wait is None:
                    self.fail([a.id], f"gave up after {attempts} attempts: {error}", attempts=attempts)
                    continue
                delay = wait if wait is not None else decision.wait if failure is not None else None
                if delay is None:
                    delay = self.policy.backoff.delay(attempts)
                Action.update(
                    status="sending" if maybe_sent else "pending",
                    attempts=attempts,
                    lease_owner=None if not maybe_sent else "retry",
                    lease_until=now + delay,
                    last_error=error[:2000],
                    updated_at=now,
                ).where(self._mine([a.id])).execute()
        self.stats.retried += len(actions)

    # -- one batch -----------------------------------------------------------------------------
    def flush_once(self) -> int:
        """Claim and send one batch; returns how many actions it settled or rescheduled."""
        actions, maybe_sent = self.claim()
        if not actions:
            return 0
        self._last_flush = time.monotonic()
        self._batch = {a.id: a for a in actions}
        claimed = len(actions)
        kind = kinds().get(actions[0].kind)
        if kind is None:  # written by a newer version, or the kind was removed: say so, keep the row
            with self.store.write():
                self.fail([a.id for a in actions], f"unknown action kind '{actions[0].kind}' — upgrade amohook")
            return claimed
        client = self.client_for(actions[0].account)
        payloads = {a.id: json.loads(a.payload) for a in actions}
        if maybe_sent:
            try:
                settled = kind.recognise(self, client, [a for a in actions if a.id in maybe_sent], payloads)
            except Exception as exc:  # the lookup did not complete: nothing may be sent blind
                self.reschedule([a for a in actions if a.id in maybe_sent], exc, maybe_sent=True)
                self.reschedule([a for a in actions if a.id not in maybe_sent], exc, maybe_sent=False, counts=False)
                return claimed
            actions = [a for a in actions if a.id not in settled]
        if actions:
            kind.send(self, client, actions, payloads)
        return claimed

    def reschedule(self, actions: list[Action], exc: BaseException, *, maybe_sent: bool, counts: bool = True) -> None:
        """Back off after ``exc``, as ``retry.decide`` says for this sender's policy."""
        if not actions:
            return
        message = exc.message if isinstance(exc, AmohookError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, RefusedBeforeRefresh):
            maybe_sent = False  # amoCRM refused it before the refresh: nothing was created
        self.later(actions, message, maybe_sent=maybe_sent, counts=counts, failure=exc)
        if needs_person(exc) or not isinstance(exc, (AmoTemporaryError, RefusedBeforeRefresh)):
            self.stats.errors.append(message)

    def hold(self, actions: list[Action]) -> list[Action]:
        """Re-assert our lease right before a POST; send only what is still ours."""
        now = self.clock()
        ids = [a.id for a in actions]
        with self.store.write():
            Action.update(lease_until=now + self.lease_seconds).where(
                self._mine(ids) & (Action.status == "sending") & (Action.lease_until > now)
            ).execute()
            held = {
                row.id
                for row in Action.select(Action.id).where(
                    self._mine(ids) & (Action.status == "sending") & (Action.lease_until > now)
                )
            }
        return [a for a in actions if a.id in held]

    # -- loop ----------------------------------------------------------------------------------
    def drain(self, max_batches: int = 10_000) -> int:
        """Send what is due now, each lane in its own thread; returns how many actions were handled."""
        lanes = self.lanes()
        if lanes == [self]:
            return self._drain(max_batches)
        counts = [0] * len(lanes)
        errors: list[BaseException] = []

        def drain_lane(i: int) -> None:
            try:
                counts[i] = lanes[i]._drain(max_batches)
            except BaseException as exc:  # raised again in the caller's thread, as without lanes
                errors.append(exc)
            finally:
                self.store.close_quietly()  # this thread's connection ends with it

        threads = [
            threading.Thread(target=drain_lane, args=(i,), name=f"amohook-actions-{s.lane}")
            for i, s in enumerate(lanes)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return sum(counts)

    def _drain(self, max_batches: int) -> int:
        total = 0
        for _ in range(max_batches):
            n = self.flush_once()
            if n == 0:
                break
            total += n
        return total

    def should_wait(self) -> bool:
        """During a burst, wait briefly for a full batch: 500 moved leads should cost 10 requests.

        A lone change goes at once: the sender waits only when it sent a batch within the last
        ``linger`` seconds (a burst is under way), so the first action after a quiet spell costs
        no wait and the ones behind it are gathered into full batches.
        """
        if self.linger <= 0 or time.monotonic() - self._last_flush > self.linger:
            return False
        now = self.clock()
        waiting = (Action.status == "pending") & (Action.lease_until.is_null())
        lane = self._in_lane()
        pending = (
            Action.select(Action.id, Action.created_at)
            .where(waiting if lane is None else waiting & lane)
            .order_by(Action.id)
            .limit(self.batch_size)
        )
        rows = list(pending)
        return 0 < len(rows) < self.batch_size and rows[0].created_at > now - self.linger

    def health(self) -> dict:
        """What this sender did since it started (for the status page and /metrics)."""
        s = self.stats
        return dict(
            posts=s.posts, lookups=s.lookups, created=s.created, adopted=s.adopted, failed=s.failed, retried=s.retried
        )

    def run(self, stop: threading.Event, idle: float = 0.5) -> None:
        """Send until ``stop``, each lane in its own thread (the first in this one); a batch in
        flight is always finished (its outcome recorded) first."""
        first, *others = self.lanes()

        def run_lane(sender: ActionSender) -> None:
            try:
                sender._run(stop, idle)
            finally:
                self.store.close_quietly()  # this thread's connection ends with it

        threads = [
            threading.Thread(target=run_lane, args=(s,), name=f"amohook-actions-{s.lane}", daemon=True) for s in others
        ]
        for thread in threads:
            thread.start()
        first._run(stop, idle)
        for thread in threads:
            thread.join()

    def _run(self, stop: threading.Event, idle: float) -> None:
        while not stop.is_set():
            try:
                if self.should_wait():
                    stop.wait(self.linger / 3)
                    continue
                if self.flush_once():
                    continue
            except Exception as exc:  # keep the loop alive; the store or a bug may recover
                self.log(f"action sender: {type(exc).__name__}: {exc}")
            self.wakeup.wait(idle)
            self.wakeup.clear()
