"""``[rule.add_note]``: a "common" text note on the lead, added once (POST /api/v4/leads/notes).

Keys carry the suffix ``|add_note`` as they always have. Notes have no due time to tell two
changes apart, so only a note created after the action was recorded is adopted as its own
(crm_platform/events-and-notes).
"""

from __future__ import annotations

from dataclasses import dataclass

from amohook.actions.base import CreateKind, PlannedAction, action_key
from amohook.rules.template import (
    check_template,
    needs_fields,
    render,
    responsible_of,
    rule_user,
    template_fields,
    template_values,
)


@dataclass(frozen=True)
class NoteSpec:
    text: str


class AddNote(CreateKind):
    name = "add_note"
    noun = "note"
    keys = frozenset({"text"})
    key_suffix = "|add_note"
    path = "/api/v4/leads/notes"
    list_key = "notes"

    def parse(self, raw, label, problems):
        self.unknown_keys(raw, label, problems)
        text = raw.get("text")
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{label} needs a text")
            text = ""
        for problem in check_template(text):
            problems.append(f"{label} text: {problem}")
        return NoteSpec(text=text)

    def describe(self, compiled, rule):
        return "a note"

    def preview(self, planned, compiled, rule):
        return f"note {planned.payload['params']['text']!r}"

    def needs_lead(self, rule, compiled, change):
        return needs_fields(change, set(template_fields(compiled.text)), rule_user(rule))

    def plan(self, rule, compiled, change, ctx):
        responsible = responsible_of(rule_user(rule), change, ctx.lead)  # {responsible.*}: the task's user
        key = action_key(rule, change, ctx.fallback, self.key_suffix)
        text = render(compiled.text, template_values(rule, change, ctx.lead, responsible)).strip() or rule.name
        payload = {"entity_id": change.lead_id, "note_type": "common", "params": {"text": text}, "request_id": key[:32]}
        return PlannedAction(
            key=key, rule=rule.name, account=rule.account, lead_id=change.lead_id, payload=payload, kind=self.name
        )

    def shown(self, payload):
        return super().shown(payload)[0], str((payload.get("params") or {}).get("text") or "")

    def lookup_params(self):
        return {"filter[note_type]": "common"}

    def same(self, found, payload, recorded_at):
        return same_note(found, payload, recorded_at)


def same_note(found: dict, payload: dict, recorded_at: float) -> bool:
    """Is this note the one the action sent? Only one created after the action was recorded counts
    (a minute of clock skew allowed)."""
    return (
        int(found.get("entity_id") or 0) == int(payload["entity_id"])
        and found.get("note_type") == payload["note_type"]
        and ((found.get("params") or {}).get("text") or "") == payload["params"]["text"]
        and int(found.get("created_at") or 0) >= int(recorded_at) - 60
    )
