"""Rules: a small TOML file turned into checked, compiled rules, and pure matching of events.

Everything here is pure except ``compile_rules``, which resolves names through the store
(``amohook.lookup``). Matching an event and planning its actions does no I/O: the plan carries a
deterministic key per (rule, lead, change), which is what makes effects happen once.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import string
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from amohook.errors import ConfigError

TRIGGERS = {
    "lead.stage_changed": "a lead moved to another stage (leads[status], or leads[update] with a new status)",
    "lead.added": "a lead was created (leads[add])",
    "lead.responsible_changed": "a lead got another responsible user (leads[responsible], or leads[update] with old_responsible_user_id)",
}
RULE_KEYS = {"name", "when", "account", "pipeline", "to_stage", "from_stage", "condition", "create_task", "add_note"}
TASK_KEYS = {"type", "text", "due", "responsible", "duration"}
NOTE_KEYS = {"text"}
CONDITION_OPS = ("equals", "not_equals", "contains", "is_set", "is_empty")
# What a template may say. Unknown placeholders are errors at `rules check` time, not at 3 a.m.
PLACEHOLDERS = {
    "lead.id", "lead.name", "lead.price",
    "pipeline.id", "pipeline.name",
    "stage.id", "stage.name",
    "from_stage.id", "from_stage.name",
    "responsible.id", "responsible.name",
    "account.subdomain",
    "rule.name",
}
# What a rules file may ask for. Beyond these a file is refused by `rules check` (and by serve and
# worker at start), never accepted and then failing at run time.
MAX_RULES_BYTES = 1024 * 1024
MAX_RULES = 1000
MAX_CONDITIONS = 20  # per rule
MAX_NESTING = 8  # tables and arrays inside one another; a rule needs 5
MAX_DUE_DAYS = 3650  # ten years ahead, whatever the units
DUE_RE = re.compile(r"^\+(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?$")
END_OF_DAY_RE = re.compile(r"^end_of_day(?:\+(\d+)d)?$")
AT_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})(?:\+(\d+)d)?$")


class RulesError(ConfigError):
    """The rules file is invalid; ``problems`` lists every problem, each naming its rule."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {path}"
        super().__init__(f"{head}: " + "; ".join(problems) if len(problems) == 1 else head + ":\n  " + "\n  ".join(problems))


# -- the file ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    field: str | int
    op: str
    value: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    type: str | int
    text: str
    due: str = "+1d"
    responsible: str | int = "lead"
    duration: int | None = None


@dataclass(frozen=True)
class NoteSpec:
    text: str


@dataclass(frozen=True)
class RuleSpec:
    name: str
    when: str
    pipeline: str | int | None = None
    to_stage: str | int | None = None
    from_stage: str | int | None = None
    account: str | None = None
    conditions: tuple[Condition, ...] = ()
    create_task: TaskSpec | None = None
    add_note: NoteSpec | None = None


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

    At most ``MAX_DUE_DAYS`` ahead: a bigger offset would overflow the date arithmetic at run time.
    """
    text = (due or "").strip().replace(" ", "")
    m = DUE_RE.match(text)
    if m and any(m.groups()):
        w, d, h, mins = (_due_number(g, due) for g in m.groups())
        seconds = (w * 7 + d) * 86400 + h * 3600 + mins * 60
        _check_due_days(seconds / 86400, due)
        return ("relative", seconds, 0, 0)
    m = END_OF_DAY_RE.match(text)
    if m:
        days = _due_number(m.group(1), due)
        _check_due_days(days, due)
        return ("end_of_day", 0, 0, days)
    m = AT_TIME_RE.match(text)
    if m and int(m.group(1)) < 24 and int(m.group(2)) < 60:
        days = _due_number(m.group(3), due)
        _check_due_days(days, due)
        return ("at", int(m.group(1)), int(m.group(2)), days)
    raise ValueError(f"cannot read due '{due}' — use +30m, +2h, +1d, +1d4h, end_of_day, end_of_day+1d or 10:00+1d")


def _due_number(digits: str | None, due: str) -> int:
    if digits and len(digits) > 9:  # more than ten years in any unit; int() of it could be slow
        _check_due_days(MAX_DUE_DAYS + 1, due)
    return int(digits or 0)


def _check_due_days(days: float, due: str) -> None:
    if days > MAX_DUE_DAYS:
        raise ValueError(f"due '{due}' is more than {MAX_DUE_DAYS} days ahead — use a shorter offset")


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


def parse_rules(text: str, path: str = "rules") -> list[RuleSpec]:
    """Read the TOML text into rule specs, collecting every shape problem (names are checked later)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(path, [f"not valid TOML: {exc}"]) from None
    except RecursionError:  # arrays or inline tables nested thousands deep: the parser's stack ran out
        raise RulesError(path, [f"arrays or tables nested more than {MAX_NESTING} deep — a rule needs 5"]) from None
    if _nesting(data) > MAX_NESTING:
        raise RulesError(path, [f"arrays or tables nested more than {MAX_NESTING} deep — a rule needs 5"])
    unknown_top = set(data) - {"rule"}
    problems: list[str] = [f"unknown top-level key '{k}' (rules are [[rule]] tables)" for k in sorted(unknown_top)]
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise RulesError(path, ["'rule' must be an array of tables: write [[rule]]"])
    if len(raw_rules) > MAX_RULES:
        raise RulesError(path, [f"{len(raw_rules)} rules — at most {MAX_RULES} in one file"])
    specs: list[RuleSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_rules, 1):
        label = f"rule #{i}"
        if not isinstance(raw, dict):
            problems.append(f"{label}: not a table")
            continue
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{label}: needs a name")
            name = label
        label = f"rule '{name}'"
        if name in seen:
            problems.append(f"{label}: the name is used twice (names identify tasks already created)")
        seen.add(name)
        for key in sorted(set(raw) - RULE_KEYS):
            problems.append(f"{label}: unknown key '{key}'")
        when = raw.get("when")
        if when not in TRIGGERS:
            problems.append(f"{label}: when = '{when}' — use one of {', '.join(TRIGGERS)}")
        for key in ("pipeline", "to_stage", "from_stage"):
            if key in raw and not isinstance(raw[key], (str, int)):
                problems.append(f"{label}: {key} must be a name or an id")
        if ("to_stage" in raw or "from_stage" in raw) and "pipeline" not in raw:
            problems.append(f"{label}: stages need their pipeline (stage ids like 142 exist in every pipeline)")
        if "from_stage" in raw and when != "lead.stage_changed":
            problems.append(f"{label}: from_stage only makes sense with when = 'lead.stage_changed'")
        conditions = []
        raw_conditions = raw.get("condition", [])
        if isinstance(raw_conditions, dict):
            raw_conditions = [raw_conditions]
        if isinstance(raw_conditions, list) and len(raw_conditions) > MAX_CONDITIONS:
            problems.append(f"{label}: {len(raw_conditions)} conditions — at most {MAX_CONDITIONS} in one rule")
            raw_conditions = []
        for j, cond in enumerate(raw_conditions if isinstance(raw_conditions, list) else [], 1):
            ops = [op for op in CONDITION_OPS if op in cond]
            extra = set(cond) - {"field", *CONDITION_OPS}
            if "field" not in cond or len(ops) != 1 or extra:
                problems.append(
                    f"{label}: condition #{j} needs field = \"name or id\" and one of "
                    f"{', '.join(CONDITION_OPS)}" + (f" (unknown: {', '.join(sorted(extra))})" if extra else "")
                )
                continue
            op = ops[0]
            value = cond[op]
            if op in ("is_set", "is_empty"):
                if value is not True:
                    problems.append(f"{label}: condition #{j}: write {op} = true")
                value = None
            else:
                value = str(value)
            conditions.append(Condition(cond["field"], op, value))
        task = None
        raw_task = raw.get("create_task")
        raw_note = raw.get("add_note")
        note = None
        if raw_task is None and raw_note is None:
            problems.append(f"{label}: needs an action: [rule.create_task] and/or [rule.add_note]")
        if raw_note is not None:
            if not isinstance(raw_note, dict):
                problems.append(f"{label}: add_note must be a table")
            else:
                for key in sorted(set(raw_note) - NOTE_KEYS):
                    problems.append(f"{label}: add_note has an unknown key '{key}'")
                note_text = raw_note.get("text")
                if not isinstance(note_text, str) or not note_text.strip():
                    problems.append(f"{label}: add_note needs a text")
                    note_text = ""
                for problem in check_template(note_text):
                    problems.append(f"{label}: add_note text: {problem}")
                note = NoteSpec(text=note_text)
        if raw_task is None:
            pass
        elif not isinstance(raw_task, dict):
            problems.append(f"{label}: create_task must be a table")
        else:
            for key in sorted(set(raw_task) - TASK_KEYS):
                problems.append(f"{label}: create_task has an unknown key '{key}'")
            if "type" not in raw_task:
                problems.append(f"{label}: create_task needs a type (task type name or id)")
            text = raw_task.get("text")
            if not isinstance(text, str) or not text.strip():
                problems.append(f"{label}: create_task needs a text")
                text = ""
            for problem in check_template(text):
                problems.append(f"{label}: text: {problem}")
            due = str(raw_task.get("due", "+1d"))
            try:
                parse_due(due)
            except ValueError as exc:
                problems.append(f"{label}: {exc}")
            duration = raw_task.get("duration")
            if duration is not None and (not isinstance(duration, int) or duration < 0):
                problems.append(f"{label}: duration is in seconds, a whole number")
            task = TaskSpec(
                type=raw_task.get("type", ""),
                text=text,
                due=due,
                responsible=raw_task.get("responsible", "lead"),
                duration=duration,
            )
        specs.append(
            RuleSpec(
                name=name,
                when=when or "",
                pipeline=raw.get("pipeline"),
                to_stage=raw.get("to_stage"),
                from_stage=raw.get("from_stage"),
                account=raw.get("account"),
                conditions=tuple(conditions),
                create_task=task,
                add_note=note,
            )
        )
    if problems:
        raise RulesError(path, problems)
    return specs


def _nesting(data: Any) -> int:
    """How deeply tables and arrays sit inside one another (the top-level table is 1)."""
    deepest = 0
    stack = [(data, 1)]
    while stack:  # iterative: a deep value must not exhaust the stack here either
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_NESTING:
            break
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def read_rules_text(path: str | Path) -> str:
    """The file's text, if it is a regular file of at most ``MAX_RULES_BYTES`` of UTF-8.

    Opened without blocking and checked before reading, so `--rules /dev/zero` or a FIFO is refused
    at once instead of being read until memory runs out (or waiting for a writer).
    """
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"cannot read the rules file {p}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise RulesError(str(p), ["not a regular file — give the path of a TOML file"])
            data = f.read(MAX_RULES_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the rules file {p}: {exc.strerror or exc}") from None
    if len(data) > MAX_RULES_BYTES:
        raise RulesError(str(p), [f"larger than {MAX_RULES_BYTES // 2**20} MiB — split it or remove unused rules"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"the rules file {p} is not UTF-8 text") from None


def load_rules_file(path: str | Path) -> list[RuleSpec]:
    return parse_rules(read_rules_text(path), str(path))


# -- compiled against the store ---------------------------------------------------------------
@dataclass(frozen=True)
class CompiledRule:
    spec: RuleSpec
    account: str
    pipeline_id: int | None
    pipeline_name: str | None
    to_stage_id: int | None
    from_stage_id: int | None
    task_type_id: int
    responsible_user_id: int | None  # None: the lead's responsible user
    stage_names: dict = field(default_factory=dict, compare=False)  # (pipeline_id, status_id) -> name
    user_names: dict = field(default_factory=dict, compare=False)  # user id -> name
    field_ids: dict = field(default_factory=dict, compare=False)  # condition field -> custom field id or None

    @property
    def name(self) -> str:
        return self.spec.name


def compile_rules(specs: list[RuleSpec], accounts: list[str], path: str = "rules") -> list[CompiledRule]:
    """Resolve names to ids through the synced store; every miss is reported with suggestions."""
    from amohook import lookup
    from amohook.store.models import CustomField, Stage, User

    problems: list[str] = []
    compiled: list[CompiledRule] = []
    # Per account, read once: the catalog of names, and the maps every compiled rule shares.
    catalogs: dict[str, lookup.Catalog] = {}
    shared: dict[str, tuple] = {}
    for spec in specs:
        label = f"rule '{spec.name}'"
        if spec.account:
            if spec.account not in accounts:
                problems.append(f"{label}: no account '{spec.account}' in the store (have: {', '.join(accounts) or 'none'})")
                continue
            account = spec.account
        elif len(accounts) == 1:
            account = accounts[0]
        else:
            problems.append(
                f"{label}: " + ("no account in the store — run `amohook init-auth`" if not accounts
                                else f"several accounts are stored; add account = \"…\" ({', '.join(accounts)})")
            )
            continue
        catalog = catalogs.setdefault(account, lookup.Catalog(account))
        if account not in shared:
            fields = list(CustomField.select().where(CustomField.account == account))
            by_id: dict[str, Any] = {}
            by_name: dict[str, Any] = {}
            for f in fields:  # the first row wins, as a scan in order would find it
                by_id.setdefault(str(f.amo_id), f)
                by_name.setdefault(lookup.normalize(f.name), f)
            shared[account] = (
                {(s.pipeline_id, s.amo_id): s.name for s in Stage.select().where(Stage.account == account)},
                {u.amo_id: u.name for u in User.select().where(User.account == account)},
                (by_id, by_name),
                [f.name for f in fields],
            )
        stage_names, user_names, (field_by_id, field_by_name), field_names = shared[account]
        try:
            pipeline = catalog.pipeline(spec.pipeline) if spec.pipeline is not None else None
            to_stage = catalog.stage(pipeline, spec.to_stage) if spec.to_stage is not None else None
            from_stage = catalog.stage(pipeline, spec.from_stage) if spec.from_stage is not None else None
        except lookup.LookupFailed as exc:
            problems.append(f"{label}: {exc.message}")
            continue
        task = spec.create_task
        task_type_id = 0
        responsible_id = None
        if task is not None:
            try:
                task_type_id = catalog.task_type(task.type).amo_id
            except lookup.LookupFailed as exc:
                problems.append(f"{label}: {exc.message}")
        if task is not None and str(task.responsible).strip().lower() != "lead":
            try:
                responsible_id = catalog.user(task.responsible).amo_id
            except lookup.LookupFailed as exc:
                problems.append(f"{label}: {exc.message}")
        field_ids = {}
        for cond in spec.conditions:
            match = field_by_id.get(str(cond.field)) or field_by_name.get(lookup.normalize(str(cond.field)))
            if field_names and match is None:
                close = lookup.suggest(str(cond.field), field_names)
                hint = f" — did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                problems.append(f"{label}: no lead custom field '{cond.field}'{hint}")
            field_ids[cond.field] = match.amo_id if match else None
        compiled.append(
            CompiledRule(
                spec=spec,
                account=account,
                pipeline_id=pipeline.amo_id if pipeline else None,
                pipeline_name=pipeline.name if pipeline else None,
                to_stage_id=to_stage.amo_id if to_stage else None,
                from_stage_id=from_stage.amo_id if from_stage else None,
                task_type_id=task_type_id,
                responsible_user_id=responsible_id,
                stage_names=stage_names,
                user_names=user_names,
                field_ids=field_ids,
            )
        )
    if problems:
        raise RulesError(path, problems)
    return compiled


# -- events to lead changes -------------------------------------------------------------------
@dataclass(frozen=True)
class LeadChange:
    """What happened to a lead, read from one webhook item (API v2 shape: every value a string)."""

    kind: str  # stage_changed, added, responsible_changed
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


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


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


def lead_changes(entity: str, action: str, data: dict) -> list[LeadChange]:
    """The lead changes one event item describes; pure, by structure."""
    if entity != "leads" or not isinstance(data, dict):
        return []
    lead_id = _int(data.get("id"))
    if lead_id is None:
        return []
    common = dict(
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


def matches(rule: CompiledRule, change: LeadChange) -> bool:
    """Does this rule fire for this change? Stages compare as (pipeline, status) pairs."""
    if f"lead.{change.kind}" != rule.spec.when:
        return False
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


def condition_holds(cond: Condition, field_id: int | None, change: LeadChange) -> bool:
    values: tuple = ()
    for cf_id, cf_name, cf_values in change.custom_fields:
        if (field_id is not None and cf_id == field_id) or str(cf_id) == str(cond.field) or (
            cf_name.strip().lower() == str(cond.field).strip().lower()
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


# -- planning ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedTask:
    """One effect to carry out once: a task (``create_task``) or a note (``add_note``)."""

    key: str
    rule: str
    account: str
    lead_id: int
    payload: dict  # the item to POST, every field (due time included) fixed now
    kind: str = "create_task"


def action_key(rule: CompiledRule, change: LeadChange, fallback: str, kind: str = "create_task") -> str:
    """One key per (rule, lead, change): the same change delivered as leads[status] and as
    leads[update], re-sent by amoCRM or replayed, gives the same key.

    The change is identified by its target stage, its origin and amoCRM's modification time; a
    hook without a time (Digital Pipeline: sent once, never retried) falls back to ``fallback``
    (the delivery).
    """
    if change.kind == "stage_changed":
        # The old pipeline is left out: some blocks carry old_pipeline_id and some do not, and a
        # lead cannot leave two stages with the same id at the same modification time.
        what = f"{change.pipeline_id}:{change.status_id}<{change.old_status_id}"
    elif change.kind == "responsible_changed":
        what = f"resp:{change.responsible_user_id}<{change.old_responsible_user_id}"
    else:
        what = "added"
    when = change.changed_at or fallback
    raw = f"{rule.account}|{rule.name}|lead:{change.lead_id}|{change.kind}|{what}|at:{when}"
    if kind != "create_task":
        raw += f"|{kind}"
    return hashlib.sha256(raw.encode()).hexdigest()


def render(template: str, values: dict[str, Any]) -> str:
    ns: dict[str, SimpleNamespace] = {}
    for dotted, value in values.items():
        head, attr = dotted.split(".", 1)
        ns.setdefault(head, SimpleNamespace())
        setattr(ns[head], attr, "" if value is None else value)
    return template.format_map(ns)


def plan_task(
    rule: CompiledRule,
    change: LeadChange,
    *,
    base_time: float,
    timezone: str | None,
    fallback: str,
    lead: dict | None = None,
) -> PlannedTask | None:
    """The task this rule creates for this change; None when the responsible user is unknown."""
    task = rule.spec.create_task
    lead = lead or {}
    responsible = rule.responsible_user_id or change.responsible_user_id or _int(lead.get("responsible_user_id"))
    if task is None or responsible is None:
        return None
    values = template_values(rule, change, lead, responsible)
    key = action_key(rule, change, fallback)
    payload = {
        "text": render(task.text, values).strip() or rule.name,
        "complete_till": due_timestamp(task.due, base_time, timezone),
        "entity_id": change.lead_id,
        "entity_type": "leads",
        "task_type_id": rule.task_type_id,
        "responsible_user_id": responsible,
        "request_id": key[:32],
    }
    if task.duration:
        payload["duration"] = task.duration
    return PlannedTask(key=key, rule=rule.name, account=rule.account, lead_id=change.lead_id, payload=payload)


def plan_note(rule: CompiledRule, change: LeadChange, *, fallback: str, lead: dict | None = None) -> PlannedTask | None:
    """The note this rule adds to the lead for this change (a "common" text note)."""
    note = rule.spec.add_note
    if note is None:
        return None
    lead = lead or {}
    responsible = rule.responsible_user_id or change.responsible_user_id or _int(lead.get("responsible_user_id"))
    key = action_key(rule, change, fallback, kind="add_note")
    payload = {
        "entity_id": change.lead_id,
        "note_type": "common",
        "params": {"text": render(note.text, template_values(rule, change, lead, responsible)).strip() or rule.name},
        "request_id": key[:32],
    }
    return PlannedTask(key=key, rule=rule.name, account=rule.account, lead_id=change.lead_id, payload=payload,
                       kind="add_note")


def template_values(rule: CompiledRule, change: LeadChange, lead: dict, responsible: int | None) -> dict:
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
        "from_stage.name": rule.stage_names.get((change.old_pipeline_id or change.pipeline_id, change.old_status_id), ""),
        "responsible.id": responsible or "",
        "responsible.name": rule.user_names.get(responsible, "") if responsible else "",
        "account.subdomain": rule.account,
        "rule.name": rule.name,
    }


def needs_lead(rule: CompiledRule, change: LeadChange) -> bool:
    """Digital Pipeline hooks carry only ids: fetch the lead when the task or note needs more."""
    task, note = rule.spec.create_task, rule.spec.add_note
    fields = set(template_fields(task.text)) if task else set()
    if note:
        fields |= set(template_fields(note.text))
    missing_name = change.name is None and bool({"lead.name", "lead.price"} & fields)
    wants_responsible = task is not None or bool({"responsible.id", "responsible.name"} & fields)
    missing_resp = wants_responsible and rule.responsible_user_id is None and change.responsible_user_id is None
    return missing_name or missing_resp


def rule_summaries(rules: Iterable[CompiledRule]) -> list[dict]:
    return [
        {
            "name": r.name,
            "when": r.spec.when,
            "account": r.account,
            "pipeline_id": r.pipeline_id,
            "to_stage_id": r.to_stage_id,
            "from_stage_id": r.from_stage_id,
            "task_type_id": r.task_type_id if r.spec.create_task else None,
            "responsible": r.responsible_user_id or "lead",
            "actions": [k for k in ("create_task", "add_note") if getattr(r.spec, k)],
        }
        for r in rules
    ]


def load_and_compile(path: str | Path) -> list[CompiledRule]:
    """Read, check and compile a rules file against the store; ``RulesError`` lists every problem."""
    from amohook.store.models import Account

    specs = load_rules_file(path)
    accounts = [a.subdomain for a in Account.select(Account.subdomain).order_by(Account.subdomain)]
    return compile_rules(specs, accounts, str(path))
