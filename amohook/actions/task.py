"""``[rule.create_task]``: a task on the lead, created once (POST /api/v4/tasks in batches).

The key derivation is the one tasks have always had (no suffix), so keys recorded before kinds
existed stay valid. A task that may already exist is found by lead, text, due time, type and
responsible user — all fixed when the action was recorded (crm_platform/tasks-api).
"""

from __future__ import annotations

from dataclasses import dataclass

from amohook.actions.base import CreateKind, PlannedAction, action_key
from amohook.rules.template import (
    check_template,
    due_timestamp,
    needs_fields,
    parse_due,
    render,
    responsible_of,
    template_fields,
    template_values,
)
from amohook.times import iso_time


@dataclass(frozen=True)
class TaskSpec:
    type: str | int
    text: str
    due: str = "+1d"
    responsible: str | int = "lead"
    duration: int | None = None


@dataclass(frozen=True)
class CompiledTask:
    spec: TaskSpec
    task_type_id: int
    responsible_user_id: int | None  # None: the lead's responsible user
    task_type_name: str = ""  # from the synced reference data, for `rules check`


class CreateTask(CreateKind):
    name = "create_task"
    noun = "task"
    keys = frozenset({"type", "text", "due", "responsible", "duration"})
    path = "/api/v4/tasks"
    list_key = "tasks"

    def parse(self, raw, label, problems):
        self.unknown_keys(raw, label, problems)
        if "type" not in raw:
            problems.append(f"{label} needs a type (task type name or id)")
        text = raw.get("text")
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{label} needs a text")
            text = ""
        for problem in check_template(text):
            problems.append(f"{label} text: {problem}")
        due = str(raw.get("due", "+1d"))
        try:
            parse_due(due)
        except ValueError as exc:
            problems.append(f"{label}: {exc}")
        duration = raw.get("duration")
        if duration is not None and (not isinstance(duration, int) or duration < 0):
            problems.append(f"{label}: duration is in seconds, a whole number")
        return TaskSpec(
            type=raw.get("type", ""), text=text, due=due, responsible=raw.get("responsible", "lead"), duration=duration
        )

    def compile(self, spec, ctx, label, problems):
        from amohook import lookup

        task_type_id, type_name, responsible_id = 0, "", None
        try:
            found = ctx.catalog.task_type(spec.type)
            task_type_id, type_name = found.amo_id, found.name
        except lookup.LookupFailed as exc:
            problems.append(f"{label}: {exc.message}")
        if str(spec.responsible).strip().lower() != "lead":
            try:
                responsible_id = ctx.catalog.user(spec.responsible).amo_id
            except lookup.LookupFailed as exc:
                problems.append(f"{label}: {exc.message}")
        return CompiledTask(spec, task_type_id, responsible_id, type_name)

    def describe(self, compiled, rule):
        return f"a task of type {compiled.task_type_name or compiled.task_type_id!r}"

    def summary(self, compiled):
        return {
            "task_type_id": compiled.task_type_id,
            "task_type": compiled.task_type_name,
            "responsible": compiled.responsible_user_id or "lead",
        }

    def preview(self, planned, compiled, rule):
        p = planned.payload
        user = p["responsible_user_id"]
        return (
            f"task {p['text']!r} due {iso_time(p['complete_till'])} for {rule.user_names.get(user) or f'user {user}'}"
        )

    def needs_lead(self, rule, compiled, change):
        # A task needs a responsible user; the template may need the lead's name.
        return (compiled.responsible_user_id is None and change.responsible_user_id is None) or needs_fields(
            change, set(template_fields(compiled.spec.text)), compiled.responsible_user_id
        )

    def plan(self, rule, compiled, change, ctx):
        responsible = responsible_of(compiled.responsible_user_id, change, ctx.lead)
        if responsible is None:
            return f"lead {change.lead_id} has no responsible user in the hook or in amoCRM; no task created"
        key = action_key(rule, change, ctx.fallback, self.key_suffix)
        payload = {
            "text": render(compiled.spec.text, template_values(rule, change, ctx.lead, responsible)).strip()
            or rule.name,
            "complete_till": due_timestamp(compiled.spec.due, ctx.base_time, ctx.timezone),
            "entity_id": change.lead_id,
            "entity_type": "leads",
            "task_type_id": compiled.task_type_id,
            "responsible_user_id": responsible,
            "request_id": key[:32],
        }
        if compiled.spec.duration:
            payload["duration"] = compiled.spec.duration
        return PlannedAction(
            key=key, rule=rule.name, account=rule.account, lead_id=change.lead_id, payload=payload, kind=self.name
        )

    def shown(self, payload):
        return super().shown(payload)[0], str(payload.get("text") or "")

    def lookup_params(self):
        return {"filter[entity_type]": "leads"}

    def same(self, found, payload, recorded_at):
        return same_task(found, payload)

    def same_effect(self, found, payload, changed_at):
        return same_task_for_change(found, payload, changed_at)


def same_task(found: dict, payload: dict) -> bool:
    """Is a task amoCRM holds the one this action sent? Every compared field was fixed at record time."""
    return (
        int(found.get("entity_id") or 0) == int(payload["entity_id"])
        and (found.get("text") or "") == payload["text"]
        and int(found.get("complete_till") or 0) == int(payload["complete_till"])
        and int(found.get("task_type_id") or 0) == int(payload["task_type_id"])
        and int(found.get("responsible_user_id") or 0) == int(payload["responsible_user_id"])
    )


def same_task_for_change(found: dict, payload: dict, changed_at: int) -> bool:
    """Is a task amoCRM holds this change's task, whoever made it? Same lead, rule text and task
    type, created at or after the change (amoCRM's clock on both sides). Due time and responsible
    are not compared: another store fixed them at its own planning."""
    try:
        created = int(found.get("created_at") or 0)
        return (
            int(found.get("entity_id") or 0) == int(payload["entity_id"])
            and (found.get("entity_type") in (None, "leads"))
            and (found.get("text") or "") == payload["text"]
            and int(found.get("task_type_id") or 0) == int(payload["task_type_id"])
            and created >= int(changed_at)
        )
    except (TypeError, ValueError):
        return False
