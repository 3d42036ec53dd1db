"""The rules file: its keys, parsing and bounds. Pure.

Each action table (``[rule.create_task]``, ``[rule.move_lead]``, …) is read and checked by its
action kind (``amohook.actions``); this module reads the rule around it: the trigger, where it
applies, the conditions. Templates and due times: ``amohook.rules.template``.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amohook.errors import ConfigError

TRIGGERS = {
    "lead.stage_changed": "a lead moved to another stage (leads[status], or leads[update] with a new status)",
    "lead.added": "a lead was created (leads[add])",
    "lead.responsible_changed": (
        "a lead got another responsible user (leads[responsible], or leads[update] with old_responsible_user_id)"
    ),
    "task.completed": "a task on a lead was completed (task[update] with action_close=1)",
    "lead.stale": "a lead has stayed in one stage for `after` without leaving (checked periodically)",
}
# The rule's own keys; each action kind adds its table's name (amohook.actions.kinds()).
BASE_KEYS = {
    "name",
    "when",
    "account",
    "pipeline",
    "to_stage",
    "from_stage",
    "stage",
    "task_type",
    "condition",
    "after",
}
# The rule's `stage`: where the lead must be when its task is completed, or where it stalls.
STAGE_TRIGGERS = ("task.completed", "lead.stale")
MIN_STALE_AFTER = 60  # seconds: a check runs every few minutes; less than a minute means nothing
CONDITION_OPS = ("equals", "not_equals", "contains", "is_set", "is_empty")
# What a rules file may ask for. Beyond these a file is refused by `rules check` (and by serve and
# worker at start), never accepted and then failing at run time.
MAX_RULES_BYTES = 1024 * 1024
MAX_RULES = 1000
MAX_CONDITIONS = 20  # per rule
MAX_NESTING = 8  # tables and arrays inside one another; a rule needs 5


class RulesError(ConfigError):
    """The rules file is invalid; ``problems`` lists every problem, each naming its rule."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {path}"
        super().__init__(
            f"{head}: " + "; ".join(problems) if len(problems) == 1 else head + ":\n  " + "\n  ".join(problems)
        )


# -- the file ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    field: str | int
    op: str
    value: str | None = None


@dataclass(frozen=True)
class RuleSpec:
    name: str
    when: str
    pipeline: str | int | None = None
    to_stage: str | int | None = None
    from_stage: str | int | None = None
    account: str | None = None
    conditions: tuple[Condition, ...] = ()
    actions: tuple = ()  # ((kind name, its parsed spec), ...) in the order of the file
    stage: str | int | None = None  # task.completed: the stage the lead must be in; lead.stale: where it stalls
    task_type: str | int | None = None  # task.completed: the completed task's type
    after: int | None = None  # lead.stale: seconds in the stage before the rule fires

    def action(self, kind: str):
        """This rule's spec for an action kind, or None."""
        return next((spec for name, spec in self.actions if name == kind), None)

    def __getattr__(self, name: str):  # spec.create_task and the like, for every registered kind
        from amohook.actions import kind_names

        if name in kind_names():
            return self.action(name)
        raise AttributeError(name)


def parse_rules(text: str, path: str = "rules") -> list[RuleSpec]:
    """Read the TOML text into rule specs, collecting every shape problem (names are checked later)."""
    from amohook.actions import kinds

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
    registry = kinds()
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
        for key in sorted(set(raw) - BASE_KEYS - set(registry)):
            problems.append(f"{label}: unknown key '{key}'")
        when = raw.get("when")
        if when not in TRIGGERS:
            problems.append(f"{label}: when = '{when}' — use one of {', '.join(TRIGGERS)}")
        problems.extend(_where_problems(raw, when, label))
        conditions = _conditions(raw, label, problems)
        actions = []
        for kind_name, kind in registry.items():
            if kind_name not in raw:
                continue
            if not isinstance(raw[kind_name], dict):
                problems.append(f"{label}: {kind_name} must be a table: write [rule.{kind_name}]")
                continue
            actions.append((kind_name, kind.parse(raw[kind_name], f"{label}: {kind_name}", problems)))
        if not actions:
            problems.append(f"{label}: needs an action: " + " and/or ".join(f"[rule.{k}]" for k in registry))
        specs.append(
            RuleSpec(
                name=name,
                when=when or "",
                pipeline=raw.get("pipeline"),
                to_stage=raw.get("to_stage"),
                from_stage=raw.get("from_stage"),
                account=raw.get("account"),
                conditions=tuple(conditions),
                actions=tuple(actions),
                stage=raw.get("stage"),
                task_type=raw.get("task_type"),
                after=_stale_after(raw, when, label, problems),
            )
        )
    if problems:
        raise RulesError(path, problems)
    return specs


def _where_problems(raw: dict, when: Any, label: str) -> list[str]:
    """Problems of the keys that say where a rule applies (pipeline, stages, task type)."""
    problems = []
    for key in ("pipeline", "to_stage", "from_stage", "stage", "task_type"):
        if key in raw and (not isinstance(raw[key], (str, int)) or isinstance(raw[key], bool)):
            problems.append(f"{label}: {key} must be a name or an id")
    if any(k in raw for k in ("to_stage", "from_stage", "stage")) and "pipeline" not in raw:
        problems.append(f"{label}: stages need their pipeline (stage ids like 142 exist in every pipeline)")
    if "from_stage" in raw and when != "lead.stage_changed":
        problems.append(f"{label}: from_stage only makes sense with when = 'lead.stage_changed'")
    if when in STAGE_TRIGGERS and "to_stage" in raw:
        problems.append(f"{label}: with when = '{when}' write stage = \"…\" (where the lead must be)")
    if "stage" in raw and when not in STAGE_TRIGGERS:
        problems.append(f"{label}: stage only makes sense with when = 'task.completed' or 'lead.stale'")
    if "task_type" in raw and when != "task.completed":
        problems.append(f"{label}: task_type only makes sense with when = 'task.completed'")
    if when == "lead.stale" and not ("pipeline" in raw and "stage" in raw):
        problems.append(f'{label}: when = \'lead.stale\' needs pipeline = "…" and stage = "…" (where the lead stalls)')
    return problems


def _stale_after(raw: dict, when: Any, label: str, problems: list[str]) -> int | None:
    """``after`` of a lead.stale rule in seconds (at least a minute), read by the one duration parser."""
    from amohook.durations import DurationError, parse_duration

    if when != "lead.stale":
        if "after" in raw:
            problems.append(f"{label}: after only makes sense with when = 'lead.stale'")
        return None
    text = raw.get("after")
    if not isinstance(text, str) or not text.strip():
        problems.append(f"{label}: when = 'lead.stale' needs after = \"3d\" (how long in the stage; 1m or more)")
        return None
    try:
        seconds = parse_duration(
            text, option="after", low=MIN_STALE_AFTER, off=False, why_low="the check runs every few minutes"
        )
    except DurationError as exc:
        problems.append(f"{label}: {exc.message}")
        return None
    return int(seconds)


def _conditions(raw: dict, label: str, problems: list[str]) -> list[Condition]:
    conditions = []
    raw_conditions = raw.get("condition", [])
    if isinstance(raw_conditions, dict):
        raw_conditions = [raw_conditions]
    if isinstance(raw_conditions, list) and len(raw_conditions) > MAX_CONDITIONS:
        problems.append(f"{label}: {len(raw_conditions)} conditions — at most {MAX_CONDITIONS} in one rule")
        raw_conditions = []
    for j, cond in enumerate(raw_conditions if isinstance(raw_conditions, list) else [], 1):
        if not isinstance(cond, dict):
            problems.append(f"{label}: condition #{j} must be a table")
            continue
        ops = [op for op in CONDITION_OPS if op in cond]
        extra = set(cond) - {"field", *CONDITION_OPS}
        if "field" not in cond or len(ops) != 1 or extra:
            problems.append(
                f'{label}: condition #{j} needs field = "name or id" and one of '
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
    return conditions


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
