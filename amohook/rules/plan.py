"""A matched change → the actions to carry out, each under a deterministic key. Pure.

The key is one per (rule, lead, change, action kind): the same change delivered as
leads[status] and as leads[update], re-sent by amoCRM or replayed, gives the same key — which is
what makes effects happen once (``amohook.actions``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from amohook.rules.changes import LeadChange
from amohook.rules.compile import CompiledRule


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


PlannedTask = PlannedAction  # the name before actions had kinds


@dataclass(frozen=True)
class PlanContext:
    """What planning may use besides the rule and the change."""

    base_time: float  # when the change was received: relative due times count from here
    timezone: str | None  # the account's, for "end_of_day" and "10:00"
    fallback: str  # names a change that carries no time (the delivery)
    lead: dict | None = None  # the lead as amoCRM holds it, when it was read


def action_key(rule: CompiledRule, change: LeadChange, fallback: str, suffix: str = "") -> str:
    """One key per (rule, lead, change); ``suffix`` tells action kinds apart (tasks have none).

    The change is identified by its target stage, its origin and amoCRM's modification time; a
    hook without a time (Digital Pipeline: sent once, never retried) falls back to ``fallback``
    (the delivery). A completed task is identified by the task alone: completing from the task
    list sends a second update for the result (crm_platform/webhooks-format).
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
    else:
        what = "added"
    raw = f"{rule.account}|{rule.name}|lead:{change.lead_id}|{change.kind}|{what}|at:{when}{suffix}"
    return hashlib.sha256(raw.encode()).hexdigest()


def plan_actions(rule: CompiledRule, change: LeadChange, ctx: PlanContext) -> tuple[list[PlannedAction], list[str]]:
    """Every action this rule takes for this change, and why any it cannot take was left out."""
    from amohook.actions import kinds

    registry = kinds()
    planned, notes = [], []
    for kind_name, action in rule.actions:
        result = registry[kind_name].plan(rule, action, change, ctx)
        if isinstance(result, str):
            notes.append(result)
        elif result is not None:
            planned.append(result)
    return planned, notes


def needs_lead(rule: CompiledRule, change: LeadChange) -> bool:
    """Digital Pipeline hooks carry only ids: fetch the lead when an action needs more."""
    from amohook.actions import kinds

    registry = kinds()
    return any(registry[k].needs_lead(rule, a, change) for k, a in rule.actions)
