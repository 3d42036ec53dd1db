"""Carrying out what rules planned: exactly once, and in batches.

The protocol, per task:
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
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from amohook.errors import (
    AccountBlocked,
    AmoApiError,
    AmoTemporaryError,
    AmohookError,
    RateLimited,
    ReauthRequired,
    RefusedBeforeRefresh,
    ValidationFailed,
)
from amohook.store.lease import new_owner
from amohook.store.models import Action

BATCH_SIZE = 50  # a conservative batch: amoCRM's documented batch caps are 50 (complex leads)
# Longer than one POST can take (connect 5 s + read 20 s, plus the rate limiter). The lease is
# re-asserted right before each POST, and a POST refused with 401 is not repeated inside it: the
# refresh may wait minutes for its own lease, after which this sender may no longer own the work.
LEASE_SECONDS = 300.0
MAX_ATTEMPTS = 10  # backoff from 30 s doubling, capped at 1 h, jittered: 1.5 to 3 hours of amoCRM trouble
HUMAN_WAIT = 900.0  # a revoked grant or a blocked account waits for a person; not an attempt


def record_planned(store, planned: Iterable, event_id: int | None, clock: Callable[[], float] = time.time) -> int:
    """Record planned tasks under their keys; returns how many were new (the rest were duplicates)."""
    rows = [
        dict(
            key=p.key,
            account=p.account,
            rule=p.rule[:255],
            event_id=event_id,
            kind=p.kind,
            payload=json.dumps(p.payload, ensure_ascii=False, sort_keys=True),
            status="pending",
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


def backoff(attempt: int, base: float = 30.0, cap: float = 3600.0) -> float:
    return min(cap, base * 2 ** max(0, attempt - 1)) * random.uniform(0.5, 1.0)


def definitely_refused(exc: BaseException) -> bool:
    """Did amoCRM answer in a way that proves it created nothing? Only a 4xx (429 included) does."""
    status = getattr(exc, "status", None)
    return isinstance(exc, AmoApiError) and status is not None and 400 <= status < 500


# Where each kind of action is sent, and under which key amoCRM lists what it created.
ENDPOINTS = {"create_task": ("/api/v4/tasks", "tasks"), "add_note": ("/api/v4/leads/notes", "notes")}


def same_note(found: dict, payload: dict, recorded_at: float) -> bool:
    """Is this note the one the action sent? Notes have no due time to tell two changes apart,
    so only a note created after the action was recorded counts (a minute of clock skew allowed)."""
    return (
        int(found.get("entity_id") or 0) == int(payload["entity_id"])
        and found.get("note_type") == payload["note_type"]
        and ((found.get("params") or {}).get("text") or "") == payload["params"]["text"]
        and int(found.get("created_at") or 0) >= int(recorded_at) - 60
    )


def same_task(found: dict, payload: dict) -> bool:
    """Is a task amoCRM holds the one this action sent? Every compared field was fixed at record time."""
    return (
        int(found.get("entity_id") or 0) == int(payload["entity_id"])
        and (found.get("text") or "") == payload["text"]
        and int(found.get("complete_till") or 0) == int(payload["complete_till"])
        and int(found.get("task_type_id") or 0) == int(payload["task_type_id"])
        and int(found.get("responsible_user_id") or 0) == int(payload["responsible_user_id"])
    )


@dataclass
class SendStats:
    posts: int = 0
    lookups: int = 0
    created: int = 0
    adopted: int = 0
    failed: int = 0
    retried: int = 0
    errors: list = field(default_factory=list)


class ActionSender:
    """Claims pending actions and sends them in batches; safe to run in many threads and processes."""

    def __init__(
        self,
        store,
        client_for: Callable[[str], object],
        *,
        owner: str | None = None,
        batch_size: int = BATCH_SIZE,
        lease_seconds: float = LEASE_SECONDS,
        max_attempts: int = MAX_ATTEMPTS,
        clock: Callable[[], float] = time.time,
        log: Callable[[str], None] | None = None,
        linger: float = 0.3,
    ):
        self.store = store
        self.client_for = client_for
        self.owner = owner or new_owner()
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.clock = clock
        self.log = log or (lambda message: None)
        self.linger = linger
        self.stats = SendStats()
        self.wakeup = threading.Event()
        self._last_flush = float("-inf")  # monotonic time of the last batch claimed

    # -- claiming ------------------------------------------------------------------------------
    def claim(self) -> tuple[list[Action], set[int]]:
        """Up to one batch of due actions of one account, marked ``sending`` and leased to us.

        Returns the actions and the ids of those that may already have reached amoCRM.
        """
        now = self.clock()
        due = ((Action.status == "pending") & (Action.lease_until.is_null() | (Action.lease_until <= now))) | (
            (Action.status == "sending") & (Action.lease_until < now)
        )
        with self.store.write():
            first = self.store.for_update(
                Action.select(Action.id, Action.account, Action.kind).where(due).order_by(Action.id).limit(1),
                skip_locked=True,
            ).first()
            if first is None:
                return [], set()
            query = (
                Action.select()
                .where(due & (Action.account == first.account) & (Action.kind == first.kind))
                .order_by(Action.id)
                .limit(self.batch_size)
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

    def _done(self, action_id: int, task_id: int | None) -> None:
        Action.update(status="done", result_id=task_id, lease_owner=None, lease_until=None, last_error=None,
                      updated_at=self.clock()).where(self._mine([action_id])).execute()

    def _fail(self, ids, error: str, status: str = "failed", **fields) -> None:
        """``failed``: gave up (an event replay revives it); ``rejected``: amoCRM refused the task itself."""
        Action.update(status=status, lease_owner=None, lease_until=None, last_error=error[:2000],
                      updated_at=self.clock(), **fields).where(self._mine(ids)).execute()

    def _later(
        self, actions: list[Action], error: str, *, maybe_sent: bool, wait: float | None = None, counts: bool = True
    ) -> None:
        """Back off; an action whose request may have landed stays ``sending`` so it is looked up first.

        ``counts=False``: waiting for amoCRM's rate limit or for a person is not an attempt.
        """
        now = self.clock()
        with self.store.write():  # one commit for the batch, not one per action
            for a in actions:
                attempts = a.attempts + (1 if counts else 0)
                if attempts >= self.max_attempts:
                    self._fail([a.id], f"gave up after {attempts} attempts: {error}", attempts=attempts)
                    continue
                delay = wait if wait is not None else backoff(attempts)
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
        claimed = len(actions)
        client = self.client_for(actions[0].account)
        payloads = {a.id: json.loads(a.payload) for a in actions}
        if maybe_sent:
            try:
                adopted = self._adopt_existing(client, [a for a in actions if a.id in maybe_sent], payloads)
            except Exception as exc:  # the lookup did not complete: nothing may be sent blind
                self._reschedule([a for a in actions if a.id in maybe_sent], exc, maybe_sent=True)
                self._reschedule([a for a in actions if a.id not in maybe_sent], exc, maybe_sent=False, counts=False)
                return claimed
            actions = [a for a in actions if a.id not in adopted]
        self._send(client, actions, payloads)
        return claimed

    def _reschedule(self, actions: list[Action], exc: BaseException, *, maybe_sent: bool, counts: bool = True) -> None:
        if not actions:
            return
        message = exc.message if isinstance(exc, AmohookError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, RefusedBeforeRefresh):
            self._later(actions, message, maybe_sent=False, wait=0.0)  # an attempt: a 401 loop must end
        elif isinstance(exc, RateLimited):
            self._later(actions, message, maybe_sent=maybe_sent, wait=exc.retry_after or 5.0, counts=False)
        elif isinstance(exc, (AccountBlocked, ReauthRequired)):
            self._later(actions, message, maybe_sent=maybe_sent, wait=HUMAN_WAIT, counts=False)
            self.stats.errors.append(message)
        else:
            self._later(actions, message, maybe_sent=maybe_sent, counts=counts)
            if not isinstance(exc, AmoTemporaryError):
                self.stats.errors.append(message)

    def _hold(self, actions: list[Action]) -> list[Action]:
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

    def _adopt_existing(self, client, actions: list[Action], payloads: dict) -> set[int]:
        """Find tasks earlier attempts may have created; mark those actions done."""
        kind = actions[0].kind
        path, key = ENDPOINTS[kind]
        lead_ids = sorted({payloads[a.id]["entity_id"] for a in actions})
        found: list[dict] = []
        for start in range(0, len(lead_ids), 50):
            chunk = lead_ids[start:start + 50]
            self.stats.lookups += 1
            params = {"filter[entity_id][]": chunk}
            if kind == "create_task":
                params["filter[entity_type]"] = "leads"
            else:
                params["filter[note_type]"] = "common"
            found.extend(client.iter_pages(path, key, params))
        # A task or note already recorded as another action's result is that action's, even when
        # it looks the same (a fixed text and an absolute due time repeat across changes).
        with self.store.write():  # the check of what is taken and the adoption, together
            found_ids = [f.get("id") for f in found if f.get("id") is not None]
            taken: set[int] = {
                row.result_id
                for row in Action.select(Action.result_id).where(
                    (Action.account == actions[0].account) & (Action.kind == kind) & Action.result_id.in_(found_ids or [0])
                )
            }
            adopted: set[int] = set()
            for a in actions:
                for task in found:
                    matched = (
                        same_task(task, payloads[a.id]) if kind == "create_task"
                        else same_note(task, payloads[a.id], a.created_at)
                    )
                    if task.get("id") not in taken and matched:
                        taken.add(task["id"])
                        adopted.add(a.id)
                        self._done(a.id, task["id"])
                        self.stats.adopted += 1
                        self.log(f"action {a.id}: adopted task {task['id']} created by an earlier attempt")
                        break
        return adopted

    def _send(self, client, actions: list[Action], payloads: dict) -> None:
        actions = self._hold(actions)
        if not actions:
            return
        by_request = {payloads[a.id]["request_id"]: a for a in actions}
        path, key = ENDPOINTS[actions[0].kind]
        self.stats.posts += 1
        try:
            answer = client.post(path, [payloads[a.id] for a in actions], repeat_after_refresh=False) or {}
        except ValidationFailed as exc:
            bad = self._invalid(exc, actions, payloads)
            if not bad:
                # Cannot tell which item amoCRM refused: give the batch up as `failed` (an event
                # replay brings it back) rather than `rejected` for good or retried blindly.
                with self.store.write():
                    self._fail([a.id for a in actions], exc.message + _details(exc))
                self.stats.failed += len(actions)
                return
            self._fail([a.id for a in bad], exc.message + _details(exc), status="rejected")
            self.stats.failed += len(bad)
            rest = [a for a in actions if a not in bad]
            # Not documented that amoCRM created none of the rest: look before sending them again.
            self._later(rest, "sent again after another task of its batch was rejected", maybe_sent=True,
                        wait=0.0, counts=False)
            return
        except Exception as exc:
            self._reschedule(actions, exc, maybe_sent=not definitely_refused(exc))
            return
        created = (answer.get("_embedded") or {}).get(key) or []
        settled = set()
        with self.store.write():
            for item in created:
                action = by_request.get(str(item.get("request_id")))
                if action is not None and action.id not in settled:
                    self._done(action.id, item.get("id"))
                    settled.add(action.id)
                    self.stats.created += 1
        missing = [a for a in actions if a.id not in settled]
        if missing:
            self._later(missing, "amoCRM's answer did not list these tasks", maybe_sent=True)

    @staticmethod
    def _invalid(exc: ValidationFailed, pending: list[Action], payloads: dict) -> list[Action]:
        by_request = {payloads[a.id]["request_id"]: a for a in pending}
        by_index = {str(i): a for i, a in enumerate(pending)}
        bad = []
        for entry in exc.validation_errors or []:
            rid = str((entry or {}).get("request_id"))
            action = by_request.get(rid) or by_index.get(rid)
            if action is not None and action not in bad:
                bad.append(action)
        return bad

    # -- loop ----------------------------------------------------------------------------------
    def drain(self, max_batches: int = 10_000) -> int:
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
        pending = Action.select(Action.id, Action.created_at).where(
            (Action.status == "pending") & (Action.lease_until.is_null())
        ).order_by(Action.id).limit(self.batch_size)
        rows = list(pending)
        return 0 < len(rows) < self.batch_size and rows[0].created_at > now - self.linger

    def run(self, stop: threading.Event, idle: float = 0.5) -> None:
        """Send until ``stop``; a batch in flight is always finished (its outcome recorded) first."""
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


def _details(exc: AmoApiError) -> str:
    parts = []
    for entry in exc.validation_errors or []:
        for err in (entry or {}).get("errors") or []:
            parts.append(f"{err.get('path')}: {err.get('detail') or err.get('code')}")
    return (" (" + "; ".join(parts[:5]) + ")") if parts else ""
