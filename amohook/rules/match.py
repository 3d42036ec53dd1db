"""Does a compiled rule fire for a change? Pure: stages compare as (pipeline, status) pairs."""

from __future__ import annotations

from amohook.rules.changes import LeadChange
from amohook.rules.compile import CompiledRule
from amohook.rules.spec import Condition


def trigger_of(change: LeadChange) -> str:
    """The ``when`` a change answers: ``lead.stage_changed``, …, ``task.completed``."""
    return "task.completed" if change.kind == "task_completed" else f"lead.{change.kind}"  # stale: lead.stale


def matches(rule: CompiledRule, change: LeadChange) -> bool:
    """Does this rule fire for this change?"""
    if trigger_of(change) != rule.spec.when:
        return False
    if change.kind == "task_completed":
        return _task_matches(rule, change)
    if change.kind == "stale":
        return _stale_matches(rule, change)
    if rule.pipeline_id is not None and change.pipeline_id is not None and change.pipeline_id != rule.pipeline_id:
        return False
    if rule.pipeline_id is not None and change.pipeline_id is None and rule.to_stage_id is not None:
        return False
    if rule.to_stage_id is not None and change.status_id != rule.to_stage_id:
        return False
    if rule.from_stage_id is not None:
        old_pipeline = change.old_pipeline_id or change.pipeline_id
        if change.old_status_id != rule.from_stage_id or old_pipeline != rule.pipeline_id:
            return False
    return all(condition_holds(c, rule.field_ids.get(c.field), change) for c in rule.spec.conditions)


def might_match(rule: CompiledRule, change: LeadChange) -> bool:
    """Could the rule fire once the lead's state is known? (task.completed: type checked first)."""
    if trigger_of(change) != rule.spec.when:
        return False
    return change.kind != "task_completed" or rule.task_type_id is None or change.task_type_id == rule.task_type_id


def needs_lead_state(rule: CompiledRule, change: LeadChange) -> bool:
    """A task hook says nothing of the lead: where it is must be read when the rule asks."""
    return (
        change.kind == "task_completed"
        and change.status_id is None
        and (rule.pipeline_id is not None or rule.stage_id is not None or bool(rule.spec.conditions))
    )


def _task_matches(rule: CompiledRule, change: LeadChange) -> bool:
    # The lead must be where the rule says when the task is completed (its state is read from
    # amoCRM by the handler when the hook lacks it: a task hook never carries it).
    if rule.task_type_id is not None and change.task_type_id != rule.task_type_id:
        return False
    if rule.pipeline_id is not None and change.pipeline_id != rule.pipeline_id:
        return False
    if rule.stage_id is not None and change.status_id != rule.stage_id:
        return False
    return all(condition_holds(c, rule.field_ids.get(c.field), change) for c in rule.spec.conditions)


def _stale_matches(rule: CompiledRule, change: LeadChange) -> bool:
    # The stale check queues one event per stay and `after`: each rule fires for its own `after`,
    # in its own pipeline and stage (status ids 142/143 exist in every pipeline).
    if change.stale_after != rule.spec.after:
        return False
    if (change.pipeline_id, change.status_id) != (rule.pipeline_id, rule.stage_id):
        return False
    return all(condition_holds(c, rule.field_ids.get(c.field), change) for c in rule.spec.conditions)


def condition_holds(cond: Condition, field_id: int | None, change: LeadChange) -> bool:
    values: tuple = ()
    for cf_id, cf_name, cf_values in change.custom_fields:
        if (
            (field_id is not None and cf_id == field_id)
            or str(cf_id) == str(cond.field)
            or (cf_name.strip().lower() == str(cond.field).strip().lower())
        ):
            values = cf_values
            break
    low = [v.strip().lower() for v in values]
    if cond.op == "is_set":
        return bool(low)
    if cond.op == "is_empty":
        return not low
    target = (cond.value or "").strip().lower()
    if cond.op == "equals":
        return target in low
    if cond.op == "not_equals":
        return target not in low
    return any(target in v for v in low)  # contains
