"""What every kind of action implements, and the two protocols the built-in kinds share.

A planned action (``PlannedAction``) carries its deterministic key (``action_key``).

The plug-in contract is ``ActionKind``: a kind reads and checks its table of the rules file
(``parse``), resolves names against the store (``compile``), plans one action from a change with a
deterministic key (``plan``), sends a claimed batch (``send``) and recognises an action that may
already have happened before it is sent again (``recognise``). While it sends, the sender
(``amohook.actions.sender``) offers it ``SenderPort`` and nothing more: the outcomes to record
(``done``, ``skip``, ``fail``, ``later``, ``reschedule``), the lease check before a request (``hold``),
the store (outcomes grouped in one ``store.write()``), the clock, counters, and what notify
needs to post (environment, HTTP session and deadline, which receivers rest). Every kind must pass
the contract suite (tests/actions/test_action_contract.py).

``CreateKind``: something amoCRM creates (a task, a note) — POSTed in batches with a
``request_id`` per item; recognised by looking it up and adopting what an earlier attempt made.
``LeadPatchKind``: a change of the lead itself (stage, field, tag) — PATCHed in batches;
idempotent by state: recognised by reading the lead (``amohook.amocrm.leads.fetch_leads``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import requests

from amohook.amocrm.leads import fetch_leads
from amohook.errors import AmoApiError, ValidationFailed, definitely_refused
from amohook.store.models import Action

if TYPE_CHECKING:
    from amohook.actions.sender import SendStats
    from amohook.amocrm.client import AmoClient
    from amohook.rules.changes import LeadChange
    from amohook.rules.compile import CompiledRule
    from amohook.store import Store

BATCH = 50  # amoCRM's documented batch cap for complex adds; PATCH /api/v4/leads documents none


@dataclass(frozen=True)
class PlannedAction:
    """One effect to carry out once; ``payload`` is fixed now (due times included)."""

    key: str
    rule: str
    account: str
    lead_id: int
    payload: dict
    kind: str
    target_id: int | None = None  # the lead an action changes (counted by the loop guard)
    skip_reason: str | None = None  # recorded as ``skipped`` with this reason, never sent


def action_key(rule: CompiledRule, change: LeadChange, fallback: str, suffix: str = "") -> str:
    """One key per (rule, lead, change); ``suffix`` tells action kinds apart (tasks have none).

    The change is identified by its target stage, its origin and amoCRM's modification time; a
    hook without a time (Digital Pipeline: sent once, never retried) falls back to ``fallback``
    (the delivery). A completed task is identified by the task alone: completing from the task
    list sends a second update for the result (crm_platform/webhooks-format). A stale lead is
    identified by its stay (pipeline, stage, the time it entered).
    """
    when = change.changed_at or fallback
    if change.kind == "stage_changed":
        # The old pipeline is left out: some blocks carry old_pipeline_id and some do not, and a
        # lead cannot leave two stages with the same id at the same modification time.
        what = f"{change.pipeline_id}:{change.status_id}<{change.old_status_id}"
    elif change.kind == "responsible_changed":
        what = f"resp:{change.responsible_user_id}<{change.old_responsible_user_id}"
    elif change.kind == "task_completed":
        what, when = f"task:{change.task_id}", "completed"
    elif change.kind == "stale":
        # The stay: lead, pipeline, stage and when it entered (``when``). Not `after`: a rule fires
        # once per stay, even if its `after` is edited later.
        what = f"stale:{change.pipeline_id}:{change.status_id}"
    else:
        what = "added"
    raw = f"{rule.account}|{rule.name}|lead:{change.lead_id}|{change.kind}|{what}|at:{when}{suffix}"
    return hashlib.sha256(raw.encode()).hexdigest()


class SenderPort(Protocol):
    """What the sender offers a kind while it sends (``ActionSender`` is the one implementation).

    Every outcome is written only while the action is still leased to this sender; a kind groups
    the outcomes of a batch in one ``store.write()``.
    """

    store: Store
    clock: Callable[[], float]  # the time outcomes are written with
    env: Mapping[str, str]  # where notify reads its URLs
    http: requests.Session  # what notify posts with, within ``http_deadline`` seconds each
    http_deadline: float
    resting: dict[str, float]  # servers other than amoCRM that gave no answer: until when they rest

    @property
    def stats(self) -> SendStats:
        """Counted by the kind: posts, lookups, created, adopted, failed, skipped."""
        ...

    def done(self, action_id: int, result_id: int | None, note: str | None = None) -> None: ...

    def skip(self, ids: list[int], note: str) -> None: ...

    def fail(self, ids: list[int], error: str, status: str = "failed") -> None: ...

    def later(
        self, actions: list[Action], error: str, *, maybe_sent: bool, wait: float | None = None, counts: bool = True
    ) -> None: ...

    def reschedule(
        self, actions: list[Action], exc: BaseException, *, maybe_sent: bool, counts: bool = True
    ) -> None: ...

    def hold(self, actions: list[Action]) -> list[Action]: ...


class ActionKind:
    """One kind of action: the plug-in contract. Subclasses set the class attributes and override
    what they need; one instance serves every thread. Listed in ``amohook.actions.registry``."""

    name = ""  # the [rule.<name>] table and Action.kind
    noun = ""  # what it makes, in a word
    keys: frozenset = frozenset()  # the keys its table may have
    key_suffix = ""  # appended to the change's key text: tells kinds apart (tasks: none, for old keys)
    batch_size = BATCH
    changes_lead = False  # its effect is a change of the lead (loop guard, cycle check)
    creates = False  # its effect is something amoCRM creates: listed on the status page when done
    # Which sender thread carries it: kinds talking to other servers than amoCRM get a lane of
    # their own, so one slow server never holds up another's actions (``ActionSender.lanes``).
    lane = "amocrm"

    # -- the rules file -----------------------------------------------------------------------
    def parse(self, raw: dict, label: str, problems: list[str]) -> Any:
        """The table's spec; every shape problem appended to ``problems`` as ``label: …``."""
        raise NotImplementedError

    def unknown_keys(self, raw: dict, label: str, problems: list[str]) -> None:
        for key in sorted(set(raw) - self.keys):
            problems.append(f"{label} has an unknown key '{key}'")

    def compile(self, spec: Any, ctx, label: str, problems: list[str]) -> Any:
        """The spec with names resolved to ids (``ctx``: ``amohook.rules.CompileContext``)."""
        return spec

    def describe(self, compiled: Any, rule) -> str:
        return self.noun

    def summary(self, compiled: Any) -> dict:
        return {}

    def preview(self, planned: PlannedAction, compiled: Any, rule) -> str:
        """One line saying what this planned action would do (``rules test``, ``rules explain``)."""
        return self.describe(compiled, rule)

    def shown(self, payload: dict) -> tuple[int | None, str]:
        """(the lead, one line of text) the status page shows for an action of this kind."""
        lead = payload.get("entity_id")
        return (lead if isinstance(lead, int) else None), ""

    def moves_to(self, compiled: Any, rule) -> tuple[int | None, int] | None:
        """The (pipeline, stage) this action moves a lead to, if it does (cycle check)."""
        return None

    # -- planning -----------------------------------------------------------------------------
    def needs_lead(self, rule, compiled: Any, change) -> bool:
        """Must the lead be read from amoCRM to plan this action (the hook lacks what it needs)?"""
        return False

    def plan(self, rule, compiled: Any, change, ctx):
        """A ``PlannedAction``, None, or a string saying why none is planned (logged)."""
        raise NotImplementedError

    # -- sending ------------------------------------------------------------------------------
    def recognise(
        self, out: SenderPort, client: AmoClient, actions: list[Action], payloads: dict[int, dict]
    ) -> set[int]:
        """Settle the actions that already happened; returns their ids. Raise if unsure.

        Called before ``send`` for the actions that may have reached amoCRM (a lost answer, an
        expired lease); what it does not settle is sent.
        """
        return set()

    def send(self, out: SenderPort, client: AmoClient, actions: list[Action], payloads: dict[int, dict]) -> None:
        """Send a claimed batch (``payloads`` by action id) and record each action's outcome with
        ``out``: ``hold`` right before the request; a 400 naming items fails only those items."""
        raise NotImplementedError


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def recovered_changes(actions: list[Action]) -> dict[int, int]:
    """{action id: the change's time} for the actions planned from an events-log entry (a change
    no webhook brought): amoCRM's ``created_at`` of the entry, which queued it as ``last_modified``;
    and for the actions of a stale lead's stay (``source = "stale"``): when the lead entered the
    stage, which another store may have settled a few seconds apart."""
    import json

    from amohook.store.models import Event

    event_ids = {a.event_id for a in actions if a.event_id is not None}
    if not event_ids:
        return {}
    times: dict[int, int] = {}
    stamp = {"events_log": "last_modified", "stale": "entered_at"}
    for row in Event.select(Event.id, Event.data, Event.source).where(
        Event.id.in_(list(event_ids)) & Event.source.in_(list(stamp))
    ):
        try:
            times[row.id] = int(json.loads(row.data).get(stamp[row.source or ""]))
        except (TypeError, ValueError, AttributeError):
            continue
    return {a.id: times[a.event_id] for a in actions if a.event_id in times}


def details(exc: AmoApiError) -> str:
    """amoCRM's validation errors, in short (path: detail)."""
    parts = []
    for entry in exc.validation_errors or []:
        for err in (entry or {}).get("errors") or []:
            parts.append(f"{err.get('path')}: {err.get('detail') or err.get('code')}")
    return (" (" + "; ".join(parts[:5]) + ")") if parts else ""


def invalid_items(exc: ValidationFailed, pending: list[Action], request_ids: dict) -> list[Action]:
    """The actions amoCRM's 400 names, by ``request_id`` or by position in the batch."""
    by_request = {request_ids[a.id]: a for a in pending}
    by_index = {str(i): a for i, a in enumerate(pending)}
    bad = []
    for entry in exc.validation_errors or []:
        rid = str((entry or {}).get("request_id"))
        action = by_request.get(rid) or by_index.get(rid)
        if action is not None and action not in bad:
            bad.append(action)
    return bad


def send_batch(
    out: SenderPort, actions: list[Action], request_ids: dict[int, str], call: Callable[[], dict | None], noun: str
) -> dict | None:
    """POST/PATCH one batch; on a 400 naming items, reject those and retry the rest after a look.

    Returns amoCRM's answer, or None when the batch's outcome was already recorded.
    """
    out.stats.posts += 1
    try:
        return call() or {}
    except ValidationFailed as exc:
        bad = invalid_items(exc, actions, request_ids)
        if not bad:
            # Cannot tell which item amoCRM refused: give the batch up as `failed` (an event
            # replay brings it back) rather than `rejected` for good or retried blindly.
            with out.store.write():
                out.fail([a.id for a in actions], exc.message + details(exc))
            out.stats.failed += len(actions)
            return None
        out.fail([a.id for a in bad], exc.message + details(exc), status="rejected")
        out.stats.failed += len(bad)
        rest = [a for a in actions if a not in bad]
        # Not documented that amoCRM applied none of the rest: look before sending them again.
        out.later(
            rest, f"sent again after another {noun} of its batch was rejected", maybe_sent=True, wait=0.0, counts=False
        )
        return None
    except Exception as exc:
        out.reschedule(actions, exc, maybe_sent=not definitely_refused(exc))
        return None


class CreateKind(ActionKind):
    """Something amoCRM creates: POST a batch with request ids; look up before a repeat."""

    creates = True
    path = ""  # where it is POSTed and listed
    list_key = ""  # under which key amoCRM lists it

    def lookup_params(self) -> dict:
        return {}

    def same(self, found: dict, payload: dict, recorded_at: float) -> bool:
        raise NotImplementedError

    def same_effect(self, found: dict, payload: dict, changed_at: int) -> bool:
        """Is ``found`` this change's effect, made by anyone (another store on the account)? Only
        for changes that came from the events log alone, and a stale lead's stay; the fields another
        store fixes differently (due time, a responsible user chosen at its own planning) are not
        compared."""
        return False

    def recognise(
        self, out: SenderPort, client: AmoClient, actions: list[Action], payloads: dict[int, dict]
    ) -> set[int]:
        """Find what earlier attempts (or another store, for a change only the events log brought)
        may have created; mark those actions done."""
        lead_ids = sorted({payloads[a.id]["entity_id"] for a in actions})
        found: list[dict] = []
        for start in range(0, len(lead_ids), 50):
            out.stats.lookups += 1
            params = {"filter[entity_id][]": lead_ids[start : start + 50], **self.lookup_params()}
            found.extend(client.iter_pages(self.path, self.list_key, params))
        found = [f for f in found if isinstance(f, dict)]
        # The oldest first: of two effects of two changes, each change adopts the one made for it.
        found.sort(key=lambda f: (_int(f.get("created_at")), _int(f.get("id"))))
        recovered = recovered_changes(actions)
        # What is already recorded as another action's result is that action's, even when it
        # looks the same (a fixed text and an absolute due time repeat across changes).
        with out.store.write():  # the check of what is taken and the adoption, together
            found_ids = [f.get("id") for f in found if f.get("id") is not None]
            taken: set[int | None] = {
                row.result_id
                for row in Action.select(Action.result_id).where(
                    (Action.account == actions[0].account)
                    & (Action.kind == self.name)
                    & Action.result_id.in_(found_ids or [0])
                )
            }
            adopted: set[int] = set()
            for a in sorted(actions, key=lambda a: (recovered.get(a.id, 0), a.id)):
                changed_at = recovered.get(a.id)
                for item in found:
                    if item.get("id") in taken:
                        continue
                    # A change from before this store's connection: the broader match first, so
                    # another store's task made moments before this action was planned is named
                    # for what it is (its note covers an earlier attempt of ours too).
                    if changed_at is not None and self.same_effect(item, payloads[a.id], changed_at):
                        note = (
                            f"{self.noun} {item['id']} was already in amoCRM for this change "
                            "(made by another store or an earlier run); not made again"
                        )
                    elif self.same(item, payloads[a.id], a.created_at):
                        note = f"{self.noun} {item['id']} was already in amoCRM (an earlier attempt made it)"
                    else:
                        continue
                    taken.add(item["id"])
                    adopted.add(a.id)
                    out.done(a.id, item["id"], note)
                    out.stats.adopted += 1
                    break
        return adopted

    def send(self, out: SenderPort, client: AmoClient, actions: list[Action], payloads: dict[int, dict]) -> None:
        actions = out.hold(actions)
        if not actions:
            return
        request_ids = {a.id: payloads[a.id]["request_id"] for a in actions}
        answer = send_batch(
            out,
            actions,
            request_ids,
            lambda: client.post(self.path, [payloads[a.id] for a in actions], repeat_after_refresh=False),
            self.noun,
        )
        if answer is None:
            return
        by_request = {request_ids[a.id]: a for a in actions}
        created = (answer.get("_embedded") or {}).get(self.list_key) or []
        settled = set()
        with out.store.write():
            for item in created:
                action = by_request.get(str(item.get("request_id")))
                if action is not None and action.id not in settled:
                    out.done(action.id, item.get("id"))
                    settled.add(action.id)
                    out.stats.created += 1
        missing = [a for a in actions if a.id not in settled]
        if missing:
            out.later(missing, f"amoCRM's answer did not list these {self.noun}s", maybe_sent=True)


LEADS_PATH = "/api/v4/leads"


class LeadPatchKind(ActionKind):
    """A change of the lead: PATCH /api/v4/leads in batches; recognised by reading the lead.

    The payload is ``{"patch": {id, request_id, …}, "from": [pipeline, stage] | None}``: the item
    to PATCH, and where the lead was when the change that planned it happened.
    """

    changes_lead = True

    def state(self, lead: dict, payload: dict) -> tuple[str, str | None]:
        """Before a repeat: ``("done", note)`` already so, ``("skip", note)`` leave it, ``("send", None)``."""
        raise NotImplementedError

    def recognise(
        self, out: SenderPort, client: AmoClient, actions: list[Action], payloads: dict[int, dict]
    ) -> set[int]:
        out.stats.lookups += 1
        leads = fetch_leads(client, [payloads[a.id]["patch"]["id"] for a in actions])
        settled: set[int] = set()
        with out.store.write():
            for a in actions:
                lead_id = payloads[a.id]["patch"]["id"]
                lead = leads.get(int(lead_id))
                if lead is None:
                    out.skip([a.id], f"lead {lead_id} is gone (deleted, or no right to read it): nothing changed")
                    out.stats.skipped += 1
                    settled.add(a.id)
                    continue
                verdict, note = self.state(lead, payloads[a.id])
                if verdict == "done":
                    out.done(a.id, lead_id, note)
                    out.stats.adopted += 1
                    settled.add(a.id)
                elif verdict == "skip":
                    out.skip([a.id], note or "skipped")
                    out.stats.skipped += 1
                    settled.add(a.id)
        return settled

    def send(self, out: SenderPort, client: AmoClient, actions: list[Action], payloads: dict[int, dict]) -> None:
        # Two actions on one lead in one batch could not be told apart in the answer (matched by
        # id): the second waits for the next batch.
        first: dict[int, Action] = {}
        for a in actions:
            first.setdefault(payloads[a.id]["patch"]["id"], a)
        later = [a for a in actions if first[payloads[a.id]["patch"]["id"]] is not a]
        if later:
            out.later(later, "another action on this lead went first", maybe_sent=False, wait=0.0, counts=False)
        actions = out.hold(list(first.values()))
        if not actions:
            return
        request_ids = {a.id: str(payloads[a.id]["patch"]["request_id"]) for a in actions}
        answer = send_batch(
            out,
            actions,
            request_ids,
            lambda: client.patch(LEADS_PATH, [payloads[a.id]["patch"] for a in actions], repeat_after_refresh=False),
            self.noun,
        )
        if answer is None:
            return
        # Matched by id: the leads answer is not documented to echo request_id (crm_platform/leads-api).
        changed = {int(item["id"]) for item in (answer.get("_embedded") or {}).get("leads") or [] if item.get("id")}
        with out.store.write():
            for a in actions:
                lead_id = int(payloads[a.id]["patch"]["id"])
                if lead_id in changed:
                    out.done(a.id, lead_id)
                    out.stats.created += 1
        missing = [a for a in actions if int(payloads[a.id]["patch"]["id"]) not in changed]
        if missing:
            out.later(missing, "amoCRM's answer did not list these leads", maybe_sent=True)
