"""The template and due-time grammar actions plan with: placeholders, their values, due dates. Pure.

A leaf: the action kinds (``amohook.actions``) and the rules file (``amohook.rules.spec``) both
use it, and it imports neither, so the two never import each other in a circle.
"""

from __future__ import annotations

import re
import string
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from amohook.durations import parse_duration
from amohook.rules.changes import as_int

if TYPE_CHECKING:
    from amohook.rules.changes import LeadChange
    from amohook.rules.compile import CompiledRule

# What a template may say. Unknown placeholders are errors at `rules check` time, not at 3 a.m.
PLACEHOLDERS = {
    "lead.id",
    "lead.name",
    "lead.price",
    "pipeline.id",
    "pipeline.name",
    "stage.id",
    "stage.name",
    "from_stage.id",
    "from_stage.name",
    "responsible.id",
    "responsible.name",
    "account.subdomain",
    "rule.name",
    "task.id",
    "task.text",  # task.completed: the completed task
}
MAX_DUE_DAYS = 3650  # ten years ahead, whatever the units
END_OF_DAY_RE = re.compile(r"^end_of_day(?:\+(\d+)d)?$")
AT_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})(?:\+(\d+)d)?$")


def template_fields(text: str) -> list[str]:
    """The placeholders of a template; raises ValueError on broken braces."""
    return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]


def _template_specs(text: str) -> list[str]:
    """Placeholders carrying a format spec or conversion ({x:d}, {x!r}): every value is text."""
    return [
        f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
        for _, name, spec, conv in string.Formatter().parse(text)
        if name is not None and (spec or conv)
    ]


def check_template(text: str) -> list[str]:
    """Problems of a template: broken braces or placeholders outside ``PLACEHOLDERS``."""
    try:
        names = template_fields(text)
    except ValueError as exc:
        return [f"broken braces ({exc}) — write {{{{ and }}}} for literal braces"]
    problems = [
        f"{field} has a format spec or conversion — write plain {{name}} placeholders"
        for field in _template_specs(text)
    ]
    for name in names:
        if name not in PLACEHOLDERS:
            import difflib

            close = difflib.get_close_matches(name, sorted(PLACEHOLDERS), n=1)
            hint = f" — did you mean {{{close[0]}}}?" if close else f" — use one of {', '.join(sorted(PLACEHOLDERS))}"
            problems.append(f"unknown placeholder {{{name}}}{hint}")
    return problems


def parse_due(due: str) -> tuple[str, int, int, int]:
    """``+1d2h``, ``+30m``, ``end_of_day``, ``end_of_day+1d``, ``10:00+1d`` → (kind, a, b, days).

    The offset after ``+`` is a duration in amohook's one grammar (amohook.durations), from 0s to
    ``MAX_DUE_DAYS`` days: a bigger offset would overflow the date arithmetic at run time.
    """
    text = (due or "").strip().replace(" ", "")
    if text.startswith("+") and text[1:]:
        seconds = parse_duration(text[1:], option="due", low=0.0, high=MAX_DUE_DAYS * 86400.0, off=False, shown=due)
        return ("relative", int(seconds), 0, 0)
    m = END_OF_DAY_RE.match(text)
    if m:
        days = _due_days(m.group(1), due)
        return ("end_of_day", 0, 0, days)
    m = AT_TIME_RE.match(text)
    if m and int(m.group(1)) < 24 and int(m.group(2)) < 60:
        days = _due_days(m.group(3), due)
        return ("at", int(m.group(1)), int(m.group(2)), days)
    raise ValueError(f"cannot read due '{due}' — use +30m, +2h, +1d, +1d4h, end_of_day, end_of_day+1d or 10:00+1d")


def _due_days(digits: str | None, due: str) -> int:
    """The whole days after ``end_of_day+`` or ``HH:MM+``, bounded as every offset is."""
    if not digits:
        return 0
    seconds = parse_duration(f"{digits}d", option="due", low=0.0, high=MAX_DUE_DAYS * 86400.0, off=False, shown=due)
    return round(seconds / 86400)  # whole days; float() read the digits, however many


def due_timestamp(due: str, base: float, tz: str | None) -> int:
    """When a task is due, from ``base`` (Unix time) in the account's timezone."""
    kind, a, b, days = parse_due(due)
    if kind == "relative":
        return int(base + a)
    zone = _zone(tz)
    local = datetime.fromtimestamp(base, zone)
    if kind == "end_of_day":
        day = local.date() + timedelta(days=days)
        return int(datetime(day.year, day.month, day.day, 23, 59, tzinfo=zone).timestamp())
    day = local.date() + timedelta(days=days)
    at = datetime(day.year, day.month, day.day, a, b, tzinfo=zone)
    if days == 0 and at.timestamp() <= base:
        at += timedelta(days=1)  # "10:00" after 10:00 means tomorrow's
    return int(at.timestamp())


def _zone(tz: str | None):
    try:
        return ZoneInfo(tz) if tz else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def render(template: str, values: dict[str, Any]) -> str:
    ns: dict[str, SimpleNamespace] = {}
    for dotted, value in values.items():
        head, attr = dotted.split(".", 1)
        ns.setdefault(head, SimpleNamespace())
        setattr(ns[head], attr, "" if value is None else value)
    return template.format_map(ns)


def responsible_of(rule_user: int | None, change: LeadChange, lead: dict | None) -> int | None:
    """The user an action is for: the rule's, else the lead's (from the hook, else from amoCRM)."""
    return rule_user or change.responsible_user_id or as_int((lead or {}).get("responsible_user_id"))


def template_values(rule: CompiledRule, change: LeadChange, lead: dict | None, responsible: int | None) -> dict:
    lead = lead or {}
    name = change.name if change.name is not None else lead.get("name")
    price = change.price if change.price is not None else lead.get("price")
    return {
        "lead.id": change.lead_id,
        "lead.name": name or "",
        "lead.price": price if price not in (None, "") else "",
        "pipeline.id": change.pipeline_id or "",
        "pipeline.name": rule.pipeline_name or "",
        "stage.id": change.status_id or "",
        "stage.name": rule.stage_names.get((change.pipeline_id, change.status_id), ""),
        "from_stage.id": change.old_status_id or "",
        "from_stage.name": rule.stage_names.get(
            (change.old_pipeline_id or change.pipeline_id, change.old_status_id), ""
        ),
        "responsible.id": responsible or "",
        "responsible.name": rule.user_names.get(responsible, "") if responsible else "",
        "account.subdomain": rule.account,
        "rule.name": rule.name,
        "task.id": change.task_id or "",
        "task.text": change.task_text or "",
    }


def needs_fields(change: LeadChange, fields: set[str], rule_user: int | None = None) -> bool:
    """Do these template placeholders ask for what the change does not carry?"""
    return (
        change.name is None
        and bool({"lead.name", "lead.price"} & fields)
        or (
            rule_user is None
            and change.responsible_user_id is None
            and bool({"responsible.id", "responsible.name"} & fields)
        )
    )


def rule_user(rule: CompiledRule) -> int | None:
    """The user a rule names for its actions (a task's ``responsible``), if any."""
    return next((u for _, a in rule.actions if (u := getattr(a, "responsible_user_id", None))), None)
