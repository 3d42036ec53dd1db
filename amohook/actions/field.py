"""``[rule.set_field]``: set a lead custom field and/or add a tag (PATCH /api/v4/leads, in batches).

The value is checked against the synced field's type by `rules check` (text, numeric, checkbox,
select by option name, date). The options of select fields are synced with the fields
(``CustomField.enums``), and a value that is none of them is refused there with the closest one:
amoCRM would refuse it with ``NotSupportedChoice`` when the change is sent (docs/amocrm.md §10.4).
A tag is added with ``tags_to_add``, which keeps the lead's other tags —
``_embedded.tags`` would replace them all (crm_platform/leads-api, crm_platform/tags-api).
Idempotent by state: before a repeat the lead is read; already so → done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime
from datetime import time as dtime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from amohook.actions.base import LeadPatchKind, PlannedAction, action_key

TEXT_TYPES = {"text", "textarea", "url", "streetaddress"}
SELECT_TYPES = {"select", "radiobutton", "multiselect"}
DATE_TYPES = {"date", "date_time", "birthday"}
SETTABLE = TEXT_TYPES | SELECT_TYPES | DATE_TYPES | {"numeric", "checkbox"}
MAX_VALUE = 4000  # characters of a text value
MAX_TAG = 100
MAX_OPTIONS_SHOWN = 10  # options named when a value is none of them and none is close


@dataclass(frozen=True)
class FieldSpec:
    field: str | int | None
    value: Any
    tag: str | None


@dataclass(frozen=True)
class CompiledField:
    field_id: int | None
    field_name: str | None
    value: Any  # as amoCRM takes it: str, int/float, bool, Unix seconds
    tag: str | None


class SetField(LeadPatchKind):
    name = "set_field"
    noun = "field change"
    keys = frozenset({"field", "value", "tag"})
    key_suffix = "|set_field"

    def parse(self, raw, label, problems):
        self.unknown_keys(raw, label, problems)
        field, tag = raw.get("field"), raw.get("tag")
        if field is None and tag is None:
            problems.append(f'{label} needs field = "…" with value = …, or tag = "…"')
        if field is not None and (not isinstance(field, (str, int)) or isinstance(field, bool)):
            problems.append(f"{label}: field must be a custom field's name or id")
            field = None
        if field is not None and "value" not in raw:
            problems.append(f"{label}: field needs a value")
        if "value" in raw and field is None:
            problems.append(f'{label}: value needs field = "…"')
        if tag is not None and (not isinstance(tag, str) or not tag.strip() or len(tag) > MAX_TAG):
            problems.append(f"{label}: tag must be a name of 1 to {MAX_TAG} characters")
            tag = None
        return FieldSpec(field=field, value=raw.get("value"), tag=tag.strip() if tag else None)

    def compile(self, spec, ctx, label, problems):
        from amohook import lookup

        field_id = field_name = value = None
        if spec.field is not None:
            row = ctx.fields_by_id.get(str(spec.field)) or ctx.fields_by_name.get(lookup.normalize(str(spec.field)))
            if row is None:
                close = lookup.suggest(str(spec.field), ctx.field_names)
                hint = (
                    f" — did you mean {', '.join(repr(c) for c in close)}?"
                    if close
                    else (" — run `amohook sync-entities` if it is new")
                )
                problems.append(f"{label}: no lead custom field '{spec.field}'{hint}")
                return None
            try:
                value = convert(row.type or "text", spec.value, ctx.timezone)
                if row.type in SELECT_TYPES:
                    check_option(row.enums, value)
            except ValueError as exc:
                problems.append(f"{label}: field '{row.name}' ({row.type}): {exc}")
                return None
            field_id, field_name = row.amo_id, row.name
        return CompiledField(field_id, field_name, value, spec.tag)

    def describe(self, compiled, rule):
        if compiled is None:
            return "set a field"
        parts = [f"set {compiled.field_name!r}"] if compiled.field_id else []
        return " and ".join(parts + ([f"tag {compiled.tag!r}"] if compiled.tag else []))

    def summary(self, compiled):
        return {"set_field": compiled.field_id, "add_tag": compiled.tag} if compiled else {}

    def plan(self, rule, compiled, change, ctx):
        if compiled is None:
            return None
        key = action_key(rule, change, ctx.fallback, self.key_suffix)
        patch: dict[str, Any] = {"id": change.lead_id, "request_id": key[:32]}
        if compiled.field_id is not None:
            patch["custom_fields_values"] = [{"field_id": compiled.field_id, "values": [{"value": compiled.value}]}]
        if compiled.tag:
            patch["tags_to_add"] = [{"name": compiled.tag}]  # only the name: id and name together duplicate tags
        return PlannedAction(
            key=key,
            rule=rule.name,
            account=rule.account,
            lead_id=change.lead_id,
            payload={"patch": patch, "from": None},
            kind=self.name,
            target_id=change.lead_id,
        )

    def state(self, lead, payload):
        patch = payload["patch"]
        done = True
        for item in patch.get("custom_fields_values") or []:
            done = done and field_holds(lead, item["field_id"], item["values"][0]["value"])
        for tag in patch.get("tags_to_add") or []:
            names = {str(t.get("name", "")).casefold() for t in ((lead.get("_embedded") or {}).get("tags") or [])}
            done = done and tag["name"].casefold() in names
        if done:
            return "done", f"lead {patch['id']} already has it: nothing sent again"
        return "send", None


def field_holds(lead: dict, field_id: int, value: Any) -> bool:
    """Does the lead (API v4 shape) hold this value in this field?"""
    for cf in lead.get("custom_fields_values") or []:
        if cf.get("field_id") == field_id:
            return any(_same(v.get("value"), value) for v in cf.get("values") or [])
    return False


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).strip().casefold() == str(b).strip().casefold()


def convert(field_type: str, value: Any, tz: str | None) -> Any:
    """A rules-file value as amoCRM takes it for this field type; ValueError says what to write."""
    if field_type in TEXT_TYPES or field_type in SELECT_TYPES:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError("write the value as text")
        text = str(value)
        if not text.strip() or len(text) > MAX_VALUE:
            raise ValueError(f"the value must be 1 to {MAX_VALUE} characters")
        return text
    if field_type == "numeric":
        if isinstance(value, bool):
            raise ValueError("write a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError("write a number") from None
        return int(number) if number.is_integer() else number
    if field_type == "checkbox":
        if not isinstance(value, bool):
            raise ValueError("write true or false")
        return value
    if field_type in DATE_TYPES:
        return _timestamp(value, tz)
    raise ValueError(
        f"fields of type {field_type} cannot be set by rules yet — use one of {', '.join(sorted(SETTABLE))}"
    )


def check_option(enums: str | None, value: str) -> None:
    """ValueError naming the closest option when ``value`` is none of a select field's options
    (``CustomField.enums``); nothing to check when they were not synced."""
    if enums is None:
        return
    try:
        options = [option["value"] for option in json.loads(enums)]
    except (ValueError, TypeError, KeyError):
        return  # not what sync writes: leave the value to amoCRM
    if value in options:
        return
    if not options:
        raise ValueError(f"{value!r} is not an option: the field has none in amoCRM")
    from amohook import lookup

    close = lookup.suggest(value, options, n=1)
    if close:
        hint = f"the closest is {close[0]!r}"
    else:  # nothing alike: name the options instead of a closest one that is not close
        shown = ", ".join(repr(option) for option in options[:MAX_OPTIONS_SHOWN])
        more = f" and {len(options) - MAX_OPTIONS_SHOWN} more" if len(options) > MAX_OPTIONS_SHOWN else ""
        hint = f"they are {shown}{more}"
    raise ValueError(
        f"{value!r} is not one of its {len(options)} options — {hint} (run `amohook sync-entities` if it is new)"
    )


def _timestamp(value: Any, tz: str | None) -> int:
    """A TOML date (midnight in the account's timezone), an offset date-time, or Unix seconds."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("give the date-time an offset (2026-05-01T10:00:00+03:00) or write a date")
        return int(value.timestamp())
    if isinstance(value, date):
        try:
            zone = ZoneInfo(tz) if tz else ZoneInfo("UTC")
        except (ZoneInfoNotFoundError, ValueError):
            zone = ZoneInfo("UTC")
        return int(datetime.combine(value, dtime(0, 0), zone).timestamp())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError("write a date (2026-05-01, unquoted), an offset date-time or Unix seconds")
