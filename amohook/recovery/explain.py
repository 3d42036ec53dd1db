"""`rules explain`: for each change of one lead, what each rule did with it, or the first reason it did not.

A change amohook saw is read from the store (its queued event, the change registry, the actions
recorded under the change's keys); a change only amoCRM's events log holds is read from there
(``GET /api/v4/events`` filtered to the lead) and judged on the lead as it is now. Reads only.

The reasons, in the order the worker meets them: another trigger; another pipeline or stage;
the first condition that failed, with the value seen; the loop guard (an action recorded as
skipped); not handled yet (the event still queued, or the change never seen by amohook).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from amohook.recovery.identity import TOLERANCE, Sighting, describe, is_known, peek, sighting_of
from amohook.recovery.reconcile import EVENT_ACTIONS, webhook_item
from amohook.recovery.rehearse import log_changes
from amohook.rules.changes import LeadChange, lead_changes, rule_changes
from amohook.rules.match import condition_holds, trigger_of
from amohook.store.models import Action, Event, Pipeline, Stage

if TYPE_CHECKING:
    from amohook.rules.compile import CompiledRule
    from amohook.rules.spec import Condition


@dataclass
class Verdict:
    """One rule on one change: fired (with what it did) or not, and the first reason."""

    rule: str
    fired: bool
    reason: str | None = None
    actions: list[dict] = field(default_factory=list)  # {"kind", "status", "amocrm_id", "note"}

    def as_dict(self) -> dict:
        return {"name": self.rule, "fired": self.fired, "reason": self.reason, "actions": self.actions}


@dataclass
class ChangeExplained:
    at: int  # amoCRM's time of the change (else when amohook received it)
    kind: str  # stage_changed, added, responsible_changed, task_completed
    what: str  # "New → Qualified in Sales"
    seen: list[str]  # how amohook learned of it: "webhook (event 12)", "events log (event 13)", or none
    rules: list[Verdict] = field(default_factory=list)

    def as_dict(self, iso) -> dict:
        return {
            "at": iso(self.at),
            "kind": self.kind,
            "what": self.what,
            "seen": self.seen,
            "rules": [v.as_dict() for v in self.rules],
        }


def explain_lead(
    client, rules: list[CompiledRule], account: str, lead_id: int, *, window_from: int, window_to: int
) -> list[ChangeExplained]:
    """Every change of ``lead_id`` in the window, oldest first, with each rule's verdict."""
    mine = [r for r in rules if r.account == account]
    names = _Names(account)
    found: dict[tuple, ChangeExplained] = {}
    unregistered: list[tuple[Sighting, ChangeExplained]] = []  # queued, not yet handled: no registry row
    for event in _events(account, lead_id, window_from, window_to):
        try:
            data = json.loads(event.data or "{}")
        except ValueError:
            continue
        for change in rule_changes(event.entity, event.action, data):
            if change.lead_id != lead_id:
                continue
            key_at = _key_at(account, change, event)
            named = change if key_at is None else replace(change, changed_at=str(key_at))
            ident = (change.kind, change.status_id, change.old_status_id, change.responsible_user_id, key_at)
            source = {"events_log": "events log", "stale": "stale check"}.get(event.source or "", "webhook")
            how = f"{source} (event {event.id})"
            if key_at is not None and ident in found:
                found[ident].seen.append(how)
                continue
            explained = ChangeExplained(_when(named, event), change.kind, names.what(change), [how])
            explained.rules = [_verdict(r, named, event, names) for r in mine]
            found[ident if key_at is not None else (ident, event.id)] = explained
            if key_at is None and change.kind not in ("task_completed", "stale"):
                s = sighting_of(account, change, source=event.source, received_at=event.received_at)
                unregistered.append((s, explained))
    lead: dict | None = None
    lead_read = False
    for entry in _log(client, lead_id, window_from, window_to):
        changes = log_changes(entry)
        if all(_known(account, c) for c in changes):
            continue  # amohook saw it: explained above from the store
        queued = [q for c in changes if (q := _queued(unregistered, c)) is not None]
        if queued and len(queued) == len(changes):
            for q in queued:
                q.seen.append(f"events log (entry {str(entry.get('id'))[:40]})")
            continue
        if not lead_read:
            from amohook.amocrm.leads import fetch_leads

            lead, lead_read = fetch_leads(client, [lead_id]).get(lead_id), True
        shaped = webhook_item(entry, lead)
        for change in lead_changes("leads", *shaped) if shaped else changes:
            explained = ChangeExplained(int(entry["created_at"]), change.kind, names.what(change), [])
            explained.rules = [_unseen_verdict(r, change, names) for r in mine]
            found[("log", str(entry.get("id")), change.kind)] = explained
    return sorted(found.values(), key=lambda c: c.at)


def _events(account: str, lead_id: int, window_from: int, window_to: int) -> list[Any]:
    """The lead's queued events in the window: its own, and task updates on it (``element_id``)."""
    window = (
        ((Event.account == account) | Event.account.is_null())
        & (Event.received_at >= window_from)
        & (Event.received_at < window_to + 1)  # the window's end is a whole second; receipt times are not
    )
    own = Event.select().where(window & (Event.entity == "leads") & (Event.entity_id == str(lead_id)))
    # A task hook's item is stored as compact JSON of strings (amohook.inbox): a LIKE narrows the
    # task updates to this lead's; rule_changes then checks the element exactly.
    tasks = Event.select().where(
        window
        & (Event.entity == "tasks")
        & (Event.action == "update")
        & Event.data.contains(f'"element_id":"{int(lead_id)}"')
    )
    return sorted([*own, *tasks], key=lambda e: (e.received_at, e.id))


def _log(client, lead_id: int, window_from: int, window_to: int) -> list[dict]:
    from amohook.amocrm.events import fetch_events

    return fetch_events(
        client,
        types=list(EVENT_ACTIONS),
        created_from=window_from,
        created_to=window_to,
        entity="lead",
        entity_id=lead_id,
    )


def _key_at(account: str, change: LeadChange, event) -> int | None:
    """The time that names this change in action keys, as the change registry holds it (a read)."""
    if change.kind in ("task_completed", "stale"):  # named by themselves, not by the registry
        return None
    s = sighting_of(account, change, source=event.source, received_at=event.received_at)
    return int(peek(s)) if is_known(s) else None  # None: queued, not handled yet


def _known(account: str, change: LeadChange) -> bool:
    """Did amohook see this log entry's change (a webhook, or a pass that queued it)? A read."""
    target, origin = describe(change)
    return is_known(
        Sighting(account, change.lead_id, change.kind, target, origin, int(change.changed_at or 0), "events_log")
    )


def _queued(unregistered: list[tuple[Sighting, ChangeExplained]], change: LeadChange) -> ChangeExplained | None:
    """The queued, not yet handled change this log entry reports (as the registry would join them)."""
    target, origin = describe(change)
    at = int(change.changed_at or 0)
    for s, explained in unregistered:
        if (
            (s.kind, s.target) == (change.kind, target)
            and (s.origin is None or origin is None or s.origin == origin)
            and abs(s.at - at) <= TOLERANCE
        ):
            return explained
    return None


def _when(change: LeadChange, event) -> int:
    try:
        return int(str(change.changed_at))
    except (TypeError, ValueError):
        return int(event.received_at)


class _Names:
    """Pipeline and stage names of one account, for people."""

    def __init__(self, account: str):
        self.pipelines: dict[int | None, str] = {
            p.amo_id: p.name for p in Pipeline.select().where(Pipeline.account == account)
        }
        self.stages: dict[tuple[int | None, int | None], str] = {
            (s.pipeline_id, s.amo_id): s.name for s in Stage.select().where(Stage.account == account)
        }

    def stage(self, pipeline_id: int | None, status_id: int | None) -> str:
        name = self.stages.get((pipeline_id, status_id))
        return repr(name) if name else f"stage {status_id}"

    def pipeline(self, pipeline_id: int | None) -> str:
        name = self.pipelines.get(pipeline_id)
        return repr(name) if name else f"pipeline {pipeline_id}"

    def what(self, change: LeadChange) -> str:
        if change.kind == "stage_changed":
            old_pipeline = change.old_pipeline_id or change.pipeline_id
            start = self.stage(old_pipeline, change.old_status_id) if change.old_status_id else "?"
            return (
                f"{start} → {self.stage(change.pipeline_id, change.status_id)} in {self.pipeline(change.pipeline_id)}"
            )
        if change.kind == "responsible_changed":
            return f"responsible user {change.old_responsible_user_id} → {change.responsible_user_id}"
        if change.kind == "task_completed":
            return f"task {change.task_id} completed"
        if change.kind == "stale":
            from amohook.durations import format_duration

            stage = self.stage(change.pipeline_id, change.status_id)
            return f"in {stage} of {self.pipeline(change.pipeline_id)} for {format_duration(change.stale_after or 0)}"
        return f"added in {self.pipeline(change.pipeline_id)}"


def why_not(rule: CompiledRule, change: LeadChange, names: _Names) -> str | None:
    """The first reason ``rule`` does not fire for ``change`` (the order ``matches`` checks), or None."""
    trigger = trigger_of(change)
    if trigger != rule.spec.when:
        return f"the rule is for {rule.spec.when}; this change is {trigger}"
    if change.kind == "task_completed":
        if rule.task_type_id is not None and change.task_type_id != rule.task_type_id:
            return f"the completed task's type is {change.task_type_id}; the rule wants {rule.task_type_id}"
        if (rule.pipeline_id is not None or rule.stage_id is not None) and change.status_id is None:
            return None  # where the lead was is read from amoCRM when the worker handles it
    else:
        if rule.pipeline_id is not None and change.pipeline_id != rule.pipeline_id:
            return (
                f"another pipeline: the lead is in {names.pipeline(change.pipeline_id)}, "
                f"the rule watches {names.pipeline(rule.pipeline_id)}"
            )
        if rule.to_stage_id is not None and change.status_id != rule.to_stage_id:
            return (
                f"another stage: the lead entered {names.stage(change.pipeline_id, change.status_id)}, "
                f"the rule wants {names.stage(rule.pipeline_id, rule.to_stage_id)}"
            )
        if rule.from_stage_id is not None:
            old_pipeline = change.old_pipeline_id or change.pipeline_id
            if change.old_status_id != rule.from_stage_id or old_pipeline != rule.pipeline_id:
                left = names.stage(old_pipeline, change.old_status_id) if change.old_status_id else "an unknown stage"
                return f"another stage: the lead left {left}, the rule wants one leaving " + names.stage(
                    rule.pipeline_id, rule.from_stage_id
                )
    if change.kind == "task_completed" and rule.stage_id is not None and change.status_id != rule.stage_id:
        return f"another stage: the lead is in {names.stage(change.pipeline_id, change.status_id)}"
    for cond in rule.spec.conditions:
        if not condition_holds(cond, rule.field_ids.get(cond.field), change):
            return f"condition failed: {_condition_text(cond)} — the value seen was {_seen(cond, rule, change)}"
    return None


def _condition_text(cond: Condition) -> str:
    value = "" if cond.value is None else f" {cond.value!r}"
    return f"{cond.field!r} {cond.op}{value}"


def _seen(cond: Condition, rule: CompiledRule, change: LeadChange) -> str:
    field_id = rule.field_ids.get(cond.field)
    for cf_id, cf_name, values in change.custom_fields:
        if (field_id is not None and cf_id == field_id) or cf_name.strip().lower() == str(cond.field).strip().lower():
            return ", ".join(repr(v) for v in values) if values else "empty"
    return "empty (the lead has no value in that field)"


def _verdict(rule: CompiledRule, change: LeadChange, event, names: _Names) -> Verdict:
    """A change amohook saw: what the rule did with it, from the actions recorded under its keys."""
    reason = why_not(rule, change, names)
    if reason is not None:
        return Verdict(rule.name, False, reason)
    rows = _actions(rule, change, event)
    if not rows:
        if event.status in ("pending", "running"):
            return Verdict(rule.name, False, f"still pending: the worker has not handled event {event.id} yet")
        if event.status == "dead":
            return Verdict(rule.name, False, f"event {event.id} gave up: {event.last_error or 'see `events show`'}")
        return Verdict(
            rule.name,
            False,
            "the rule matched but recorded no action (the lead was gone, had no responsible user, or was "
            "elsewhere when a task's lead was read) — see the worker's log",
        )
    actions = [
        {"kind": a.kind, "status": a.status, "amocrm_id": a.result_id, "note": a.last_error, "event": a.event_id}
        for a in rows
    ]
    guarded = [a for a in rows if a.status == "skipped" and (a.last_error or "").startswith("loop guard")]
    if guarded and len(guarded) == len(rows):
        return Verdict(rule.name, False, guarded[0].last_error, actions)
    handled = [a for a in rows if a.event_id is not None and a.event_id != event.id]
    reason = None
    if handled and len(handled) == len(rows):
        reason = f"a change already handled: its actions were recorded from event {handled[0].event_id}"
    elif any(a.status in ("pending", "sending") for a in rows):
        reason = "still pending: recorded, not yet sent to amoCRM"
    return Verdict(rule.name, True, reason, actions)


def _actions(rule: CompiledRule, change: LeadChange, event) -> list[Any]:
    from amohook.actions import kinds
    from amohook.actions.base import action_key

    registry = kinds()
    fallback = f"delivery:{event.delivery_id}"
    keys = [action_key(rule, change, fallback, registry[k].key_suffix) for k, _ in rule.actions]
    return list(Action.select().where(Action.key.in_(keys)).order_by(Action.id))


def _unseen_verdict(rule: CompiledRule, change: LeadChange, names: _Names) -> Verdict:
    """A change only the events log holds (judged on the lead as it is now)."""
    reason = why_not(rule, change, names)
    if reason is not None:
        if reason.startswith("condition failed"):
            reason += " (on the lead as it is now)"
        return Verdict(rule.name, False, reason)
    return Verdict(
        rule.name,
        False,
        "amohook never saw this change (no webhook came and no reconciliation pass read it yet) — "
        "`amohook reconcile` queues it",
    )
