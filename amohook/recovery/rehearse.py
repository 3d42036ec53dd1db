"""`rules test`: what a rules file would have done over a window of amoCRM's events log, doing nothing.

The window's lead changes are read from the events log (``GET /api/v4/events``, pages of 100) and
the leads they touch in batches of 250 (``GET /api/v4/leads``); each change is matched and planned
by the same pure code the worker uses (``amohook.rules``), in the order the changes happened, with
due times counted from when each change happened. Nothing is written: no event is queued, no
change registered, no action recorded, so running the rules for real afterwards still does
everything. amoCRM gets GET requests only, through the same shared rate limit as every process.

What a rehearsal cannot know, and says: a condition on a custom field, a template's lead name and
the lead's responsible user are judged on the lead as it is now (the log records the stage, not
the fields); chains (a rule's own move starting another rule) are not followed, since the log
holds only what really happened; ``task.completed`` rules are not rehearsed (the log's
``task_completed`` entries say neither the lead nor the task's type without a read per task).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from amohook.amocrm.events import iter_event_pages
from amohook.amocrm.leads import LEAD_BATCH, fetch_leads
from amohook.recovery.reconcile import EVENT_ACTIONS, webhook_item
from amohook.rules.changes import LeadChange, lead_changes
from amohook.rules.guard import MAX_CHANGES, WINDOW, stop_reason
from amohook.rules.match import matches, might_match
from amohook.rules.plan import PlanContext, plan_actions

if TYPE_CHECKING:
    from amohook.rules.compile import CompiledRule

# Triggers the events log can replay: its lead_added, lead_status_changed and
# entity_responsible_changed entries (amoCRM docs: crm_platform/events-and-notes, event types).
REHEARSED = {"lead.added", "lead.stage_changed", "lead.responsible_changed"}
CANNOT_KNOW = (
    "conditions on fields, lead names and responsible users are judged on the leads as they are now, "
    "not as they were when each change happened"
)


@dataclass(frozen=True)
class PreviewAction:
    """One action a rule would have planned: its kind, lead, a one-line summary, and when."""

    kind: str
    lead: int
    summary: str
    at: int  # when the change that planned it happened (amoCRM's created_at)
    skipped: str | None = None  # the loop guard's reason, had it stopped this one
    order: tuple = ()  # (at, log entry id, rule's place, action's place): the order changes happened
    changes_lead: bool = False  # counted by the loop guard

    def as_dict(self) -> dict:
        summary = self.summary if self.skipped is None else f"skipped ({self.skipped}): {self.summary}"
        return {"lead": self.lead, "kind": self.kind, "summary": summary}


@dataclass
class RulePreview:
    name: str
    when: str
    matched: int = 0
    actions: list[PreviewAction] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why a matched change planned nothing
    rehearsed: bool = True


@dataclass
class Rehearsal:
    """What the rules would have done in ``[window_from, window_to]`` (Unix seconds)."""

    account: str
    window_from: int
    window_to: int
    changes: int = 0  # lead changes the log held in the window
    entries: int = 0  # log entries read
    requests: int = 0
    rules: list[RulePreview] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def rehearse(
    client, rules: list[CompiledRule], account: str, *, window_from: int, window_to: int, timezone: str | None
) -> Rehearsal:
    """Run ``rules`` over ``account``'s events log for the window; reads only (see the module doc).

    Each entry is planned as soon as its lead is read, so the work fits in the rate limit's waits;
    the loop guard, which needs the changes in the order they happened, is replayed at the end.
    """
    mine = [r for r in rules if r.account == account]
    result = Rehearsal(account, int(window_from), int(window_to))
    result.rules = [RulePreview(r.name, r.spec.when, rehearsed=r.spec.when in REHEARSED) for r in mine]
    for preview in result.rules:
        if not preview.rehearsed:
            result.notes.append(f"rule '{preview.name}' ({preview.when}) is not rehearsed: the log cannot replay it")
    active = [(r, p) for r, p in zip(mine, result.rules, strict=True) if p.rehearsed]
    if not active:
        return result
    # The stage part of each rule (``matches`` without its conditions): decides before a lead read
    # whether a rule could fire at all; the conditions need the lead.
    where = [replace(r, spec=replace(r.spec, conditions=())) if r.spec.conditions else r for r, _ in active]
    before = client.requests_made
    leads: dict[int, dict] = {}
    read: set[int] = set()  # leads read (those amoCRM did not return are gone)
    unread: list[int] = []  # leads asked for, waiting for a full batch
    waiting: list[dict] = []  # entries whose lead is not read yet
    plan = _Planner(active, timezone)

    def read_batch(ids: list[int]) -> None:
        nonlocal waiting
        leads.update(fetch_leads(client, ids))
        read.update(ids)
        still = []
        for entry in waiting:
            if int(entry["entity_id"]) in read:
                plan.entry(entry, leads.get(int(entry["entity_id"])))
            else:
                still.append(entry)
        waiting = still

    pages = iter_event_pages(
        client, types=list(EVENT_ACTIONS), created_from=window_from, created_to=window_to, entity="lead"
    )
    for page in pages:
        result.entries += len(page)
        for entry in page:
            changes = log_changes(entry)
            result.changes += len(changes)
            if not any(
                might_match(r, c) and matches(w, c) for (r, _), w in zip(active, where, strict=True) for c in changes
            ):
                continue  # no rule can fire for it, whatever the lead holds: its lead is not read
            lead_id = int(entry["entity_id"])
            if lead_id in read:
                plan.entry(entry, leads.get(lead_id))
                continue
            waiting.append(entry)
            if lead_id not in unread:
                unread.append(lead_id)
        while len(unread) >= LEAD_BATCH:
            batch, unread = unread[:LEAD_BATCH], unread[LEAD_BATCH:]
            read_batch(batch)
    if unread:
        read_batch(unread)
    plan.replay_guard()
    result.requests = client.requests_made - before
    return result


def log_changes(entry: dict) -> list[LeadChange]:
    """The lead changes one log entry reports, judged on the entry alone (no lead read)."""
    try:
        shaped = webhook_item(entry, None)
        if shaped is None or not str(entry.get("entity_id")).isdecimal():
            return []
        return lead_changes("leads", *shaped)
    except (TypeError, ValueError):  # a shape amoCRM does not document: passed over, as reconciliation does
        return []


class _Planner:
    """Matches and plans entries as their leads arrive; replays the loop guard once all are in."""

    def __init__(self, active: list[tuple[CompiledRule, RulePreview]], timezone: str | None):
        from amohook.actions import kinds

        self.active = active
        self.timezone = timezone
        self.registry = kinds()

    def entry(self, entry: dict, lead: dict | None) -> None:
        shaped = webhook_item(entry, lead)
        if shaped is None:
            return
        at = int(entry["created_at"])
        for change in lead_changes("leads", *shaped):
            for index, (rule, preview) in enumerate(self.active):
                if not matches(rule, change):
                    continue
                preview.matched += 1
                if lead is None:
                    preview.notes.append(f"lead {change.lead_id} is gone (deleted, or no right to read it)")
                    continue
                ctx = PlanContext(at, self.timezone, f"events_log:{entry.get('id')}", lead)
                planned, notes = plan_actions(rule, change, ctx)
                preview.notes.extend(notes)
                for n, p in enumerate(planned):
                    kind = self.registry[p.kind]
                    summary = kind.preview(p, rule.action(p.kind), rule)
                    order = (at, str(entry.get("id")), index, n)
                    preview.actions.append(
                        PreviewAction(p.kind, p.lead_id, summary, at, None, order, kind.changes_lead)
                    )

    def replay_guard(self) -> None:
        """The actions in the order their changes happened, the loop guard's skips marked."""
        for _, preview in self.active:
            preview.actions.sort(key=lambda a: a.order)
        changing = [
            (a.order, preview, i) for _, preview in self.active for i, a in enumerate(preview.actions) if a.changes_lead
        ]
        times: dict[int, list[int]] = {}
        for _, preview, i in sorted(changing, key=lambda c: c[0]):
            action = preview.actions[i]
            recent = [t for t in times.get(action.lead, []) if action.at - WINDOW <= t <= action.at]
            if len(recent) >= MAX_CHANGES:
                preview.actions[i] = replace(action, skipped=stop_reason(len(recent)))
            else:
                times.setdefault(action.lead, []).append(action.at)
