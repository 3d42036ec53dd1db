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

from dataclasses import dataclass, field
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
    """Run ``rules`` over ``account``'s events log for the window; reads only (see the module doc)."""
    mine = [r for r in rules if r.account == account]
    result = Rehearsal(account, int(window_from), int(window_to))
    result.rules = [RulePreview(r.name, r.spec.when, rehearsed=r.spec.when in REHEARSED) for r in mine]
    for preview in result.rules:
        if not preview.rehearsed:
            result.notes.append(f"rule '{preview.name}' ({preview.when}) is not rehearsed: the log cannot replay it")
    active = [(r, p) for r, p in zip(mine, result.rules, strict=True) if p.rehearsed]
    before = client.requests_made
    entries: list[dict] = []
    leads: dict[int, dict] = {}
    unread: list[int] = []
    asked: set[int] = set()
    if active:
        pages = iter_event_pages(
            client, types=list(EVENT_ACTIONS), created_from=window_from, created_to=window_to, entity="lead"
        )
        for page in pages:
            result.entries += len(page)
            for entry in page:
                changes = _changes_of(entry)
                result.changes += len(changes)
                if not any(might_match(r, c) and _may_match_here(r, c) for r, _ in active for c in changes):
                    continue  # no rule can fire for it, whatever the lead holds: its lead is not read
                entries.append(entry)
                lead_id = int(entry["entity_id"])
                if lead_id not in asked:
                    asked.add(lead_id)
                    unread.append(lead_id)
            # Read the leads as soon as a batch is waiting, so memory holds entries, not pending ids.
            while len(unread) >= LEAD_BATCH:
                leads.update(fetch_leads(client, unread[:LEAD_BATCH]))
                unread = unread[LEAD_BATCH:]
        if unread:
            leads.update(fetch_leads(client, unread))
    guard = _Guard()
    for entry in sorted(entries, key=_order):
        lead = leads.get(int(entry["entity_id"]))
        shaped = webhook_item(entry, lead)
        if shaped is None:
            continue
        for change in lead_changes("leads", *shaped):
            for rule, preview in active:
                if not matches(rule, change):
                    continue
                preview.matched += 1
                if lead is None:
                    preview.notes.append(f"lead {change.lead_id} is gone (deleted, or no right to read it)")
                    continue
                _plan(rule, preview, change, entry, lead, timezone, guard)
    result.requests = client.requests_made - before
    return result


def _order(entry: dict) -> tuple[int, str]:
    return int(entry["created_at"]), str(entry.get("id"))


def _changes_of(entry: dict) -> list[LeadChange]:
    """The lead changes one log entry reports, judged on the entry alone (no lead read)."""
    try:
        shaped = webhook_item(entry, None)
        if shaped is None or not str(entry.get("entity_id")).isdecimal():
            return []
        return lead_changes("leads", *shaped)
    except (TypeError, ValueError):  # a shape amoCRM does not document: passed over, as reconciliation does
        return []


def _may_match_here(rule: CompiledRule, change: LeadChange) -> bool:
    """``matches`` before the lead is read: the stage part only (conditions need the lead)."""
    return matches(rule, change) if not rule.spec.conditions else matches(_without_conditions(rule), change)


def _without_conditions(rule: CompiledRule) -> CompiledRule:
    from dataclasses import replace

    return replace(rule, spec=replace(rule.spec, conditions=()))


class _Guard:
    """The loop guard replayed in memory: rule-made lead changes per lead, by change time."""

    def __init__(self):
        self.times: dict[int, list[int]] = {}

    def reason(self, lead: int, at: int) -> str | None:
        recent = [t for t in self.times.get(lead, []) if at - WINDOW <= t <= at]
        return stop_reason(len(recent)) if len(recent) >= MAX_CHANGES else None

    def count(self, lead: int, at: int) -> None:
        self.times.setdefault(lead, []).append(at)


def _plan(
    rule: CompiledRule,
    preview: RulePreview,
    change: LeadChange,
    entry: dict,
    lead: dict,
    timezone: str | None,
    guard: _Guard,
) -> None:
    from amohook.actions import kinds

    registry = kinds()
    at = int(entry["created_at"])
    ctx = PlanContext(base_time=at, timezone=timezone, fallback=f"events_log:{entry.get('id')}", lead=lead)
    planned, notes = plan_actions(rule, change, ctx)
    preview.notes.extend(notes)
    for p in planned:
        kind = registry[p.kind]
        skipped = None
        if kind.changes_lead:
            skipped = guard.reason(p.lead_id, at)
            if skipped is None:
                guard.count(p.lead_id, at)
        preview.actions.append(
            PreviewAction(p.kind, p.lead_id, kind.preview(p, rule.action(p.kind), rule), at, skipped)
        )
