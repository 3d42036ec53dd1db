"""A matched change → the actions to carry out, each under a deterministic key. Pure.

The key is one per (rule, lead, change, action kind): the same change delivered as
leads[status] and as leads[update], re-sent by amoCRM or replayed, gives the same key — which is
what makes effects happen once (``amohook.actions``; the key: ``amohook.actions.base.action_key``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from amohook.rules.changes import LeadChange
from amohook.rules.compile import CompiledRule

if TYPE_CHECKING:
    from amohook.actions.base import PlannedAction


@dataclass(frozen=True)
class PlanContext:
    """What planning may use besides the rule and the change."""

    base_time: float  # when the change was received: relative due times count from here
    timezone: str | None  # the account's, for "end_of_day" and "10:00"
    fallback: str  # names a change that carries no time (the delivery)
    lead: dict | None = None  # the lead as amoCRM holds it, when it was read


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
