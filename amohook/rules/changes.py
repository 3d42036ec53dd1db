"""A webhook item (or an events-log entry turned into one) → the changes rules react to. Pure.

Lead blocks (``leads[status|update|add|responsible]``) give lead changes; a ``task[update]`` item
that closed a task on a lead gives a ``task_completed`` change (amoCRM's docs,
crm_platform/webhooks-format: ``action_close`` "1 - при текущем обновлении задача была завершена").
A ``leads[stale]`` item is amohook's own: the stale check (``amohook.rules.stale``) queues one when
a lead has stayed in a stage for a rule's ``after``; it gives a ``stale`` change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LEAD_ELEMENT_TYPE = "2"  # element_type of a task on a lead in hooks (API v2 codes: 1 contact, 2 lead)


@dataclass(frozen=True)
class LeadChange:
    """What happened to a lead, read from one webhook item (API v2 shape: every value a string)."""

    kind: str  # stage_changed, added, responsible_changed, task_completed, stale
    lead_id: int
    pipeline_id: int | None
    status_id: int | None
    old_pipeline_id: int | None
    old_status_id: int | None
    responsible_user_id: int | None
    old_responsible_user_id: int | None
    name: str | None
    price: str | None
    changed_at: str | None  # last_modified / updated_at as sent: identifies the change
    custom_fields: tuple = ()  # ((id, name, (values...)), ...)
    task_id: int | None = None  # task_completed: the task, its type and text
    task_type_id: int | None = None
    task_text: str | None = None
    stale_after: int | None = None  # stale: the seconds in the stage it was queued for; changed_at: entered


def as_int(value: Any) -> int | None:
    """An id or number as amoCRM sends it (a string in hooks), or None."""
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


_int = as_int


def _custom_fields(data: dict) -> tuple:
    out = []
    raw = data.get("custom_fields") or []
    items = raw.values() if isinstance(raw, dict) else raw
    for cf in items:
        if not isinstance(cf, dict):
            continue
        values = cf.get("values") or []
        values = values.values() if isinstance(values, dict) else values
        flat = []
        for v in values:
            # Text values come as values[i][value]; date-like ones as a bare values[i] (docs/amocrm.md §5).
            flat.append(str(v.get("value", v.get("enum", ""))) if isinstance(v, dict) else str(v))
        out.append((_int(cf.get("id")), str(cf.get("name") or ""), tuple(x for x in flat if x != "")))
    return tuple(out)


def webhook_custom_fields(lead: dict) -> list[dict]:
    """A lead's ``custom_fields_values`` (API v4, as GET /api/v4/leads gives them) in the shape a
    webhook carries them (API v2: ``id``, ``name``, ``values`` of strings), for an item made from a
    lead read rather than received: reconciliation's and the stale check's."""

    def text(value: Any) -> str | None:
        return None if value is None or value == "" else str(value)

    fields = []
    for cf in lead.get("custom_fields_values") or []:
        if isinstance(cf, dict):
            values = [{"value": text(v.get("value"))} for v in cf.get("values") or [] if isinstance(v, dict)]
            fields.append({"id": text(cf.get("field_id")), "name": text(cf.get("field_name")), "values": values})
    return fields


def lead_changes(entity: str, action: str, data: dict) -> list[LeadChange]:
    """The lead changes one event item describes; pure, by structure."""
    if entity != "leads" or not isinstance(data, dict):
        return []
    lead_id = _int(data.get("id"))
    if lead_id is None:
        return []
    common: dict[str, Any] = dict(
        lead_id=lead_id,
        pipeline_id=_int(data.get("pipeline_id")),
        status_id=_int(data.get("status_id")),
        old_pipeline_id=_int(data.get("old_pipeline_id")),
        old_status_id=_int(data.get("old_status_id")),
        responsible_user_id=_int(data.get("responsible_user_id")),
        old_responsible_user_id=_int(data.get("old_responsible_user_id")),
        name=data.get("name") if isinstance(data.get("name"), str) else None,
        price=data.get("price") if isinstance(data.get("price"), str) else None,
        changed_at=str(data.get("last_modified") or data.get("updated_at") or "") or None,
        custom_fields=_custom_fields(data),
    )
    changes = []
    old_pipeline = common["old_pipeline_id"] or common["pipeline_id"]
    moved = common["old_status_id"] is not None and (
        common["old_status_id"] != common["status_id"] or old_pipeline != common["pipeline_id"]
    )
    if action == "status" or (action == "update" and moved):
        # leads[status] is a stage change by definition (Digital Pipeline hooks carry only ids);
        # leads[update] is one only when it carries an old_status_id that differs.
        if common["status_id"] is not None:
            changes.append(LeadChange(kind="stage_changed", **common))
    if action == "add":
        changes.append(LeadChange(kind="added", **common))
    responsible_moved = (
        common["old_responsible_user_id"] is not None
        and common["old_responsible_user_id"] != common["responsible_user_id"]
    )
    if action == "responsible" or (action == "update" and responsible_moved):
        changes.append(LeadChange(kind="responsible_changed", **common))
    return changes


def task_changes(entity: str, action: str, data: dict) -> list[LeadChange]:
    """A task on a lead closed by this update: one ``task_completed`` change; otherwise none.

    Only ``action_close == 1`` counts: a completed task edited later still says ``status=1``, and
    completing a task from the task list sends a second update (its result) without
    ``action_close`` (crm_platform/webhooks-format).
    """
    if entity != "tasks" or action != "update" or not isinstance(data, dict):
        return []
    if str(data.get("action_close", "")).strip() != "1":
        return []
    if str(data.get("element_type", "")).strip() != LEAD_ELEMENT_TYPE:
        return []
    lead_id, task_id = _int(data.get("element_id")), _int(data.get("id"))
    if not lead_id or task_id is None:
        return []
    text = data.get("text")
    return [
        LeadChange(
            kind="task_completed",
            lead_id=lead_id,
            pipeline_id=None,
            status_id=None,
            old_pipeline_id=None,
            old_status_id=None,
            responsible_user_id=None,
            old_responsible_user_id=None,
            name=None,
            price=None,
            changed_at=str(data.get("last_modified") or "") or None,
            task_id=task_id,
            task_type_id=_int(data.get("task_type")),
            task_text=text if isinstance(text, str) else None,
        )
    ]


STALE_ACTION = "stale"  # the event action of a stay the stale check found long enough


def stale_changes(entity: str, action: str, data: dict) -> list[LeadChange]:
    """A ``leads[stale]`` item: the lead has been in ``pipeline_id``/``status_id`` since
    ``entered_at`` for ``stale_after`` seconds. The stay (lead, pipeline, stage, entered_at) is the
    change: ``changed_at`` is its entry time."""
    if entity != "leads" or action != STALE_ACTION or not isinstance(data, dict):
        return []
    lead_id, after, entered = _int(data.get("id")), _int(data.get("stale_after")), _int(data.get("entered_at"))
    pipeline_id, status_id = _int(data.get("pipeline_id")), _int(data.get("status_id"))
    if None in (lead_id, after, entered, pipeline_id, status_id):
        return []
    return [
        LeadChange(
            kind="stale",
            lead_id=lead_id,  # type: ignore[arg-type]  # checked above
            pipeline_id=pipeline_id,
            status_id=status_id,
            old_pipeline_id=None,
            old_status_id=None,
            responsible_user_id=_int(data.get("responsible_user_id")),
            old_responsible_user_id=None,
            name=data.get("name") if isinstance(data.get("name"), str) else None,
            price=data.get("price") if isinstance(data.get("price"), str) else None,
            changed_at=str(entered),
            custom_fields=_custom_fields(data),
            stale_after=after,
        )
    ]


def rule_changes(entity: str, action: str, data: dict) -> list[LeadChange]:
    """Every change rules may react to in one event item."""
    return lead_changes(entity, action, data) + task_changes(entity, action, data) + stale_changes(entity, action, data)
