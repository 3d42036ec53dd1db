"""Rules: a small TOML file turned into checked, compiled rules, and pure matching of changes.

``spec`` reads the file, ``template`` is the grammar of its templates and due times, ``compile``
resolves names against the store, ``changes`` turns event items into changes, ``match`` decides
whether a rule fires, ``plan`` turns a match into keyed actions (each kind of action lives in
``amohook.actions``), ``handler`` joins them for the worker.
"""

from amohook.rules.changes import LeadChange, as_int, lead_changes, rule_changes, task_changes
from amohook.rules.compile import (
    CompileContext,
    CompiledRule,
    compile_rules,
    describe_actions,
    load_and_compile,
    rule_summaries,
)
from amohook.rules.match import condition_holds, matches, might_match, needs_lead_state, trigger_of
from amohook.rules.plan import (
    PlanContext,
    needs_lead,
    plan_actions,
)
from amohook.rules.spec import (
    BASE_KEYS,
    CONDITION_OPS,
    MAX_CONDITIONS,
    MAX_NESTING,
    MAX_RULES,
    MAX_RULES_BYTES,
    TRIGGERS,
    Condition,
    RulesError,
    RuleSpec,
    load_rules_file,
    parse_rules,
    read_rules_text,
)
from amohook.rules.template import (
    MAX_DUE_DAYS,
    PLACEHOLDERS,
    check_template,
    due_timestamp,
    parse_due,
    render,
    template_fields,
    template_values,
)

__all__ = [
    "BASE_KEYS",
    "CONDITION_OPS",
    "MAX_CONDITIONS",
    "MAX_DUE_DAYS",
    "MAX_NESTING",
    "MAX_RULES",
    "MAX_RULES_BYTES",
    "PLACEHOLDERS",
    "TRIGGERS",
    "CompileContext",
    "CompiledRule",
    "Condition",
    "LeadChange",
    "PlanContext",
    "RuleSpec",
    "RulesError",
    "as_int",
    "check_template",
    "compile_rules",
    "condition_holds",
    "describe_actions",
    "due_timestamp",
    "lead_changes",
    "load_and_compile",
    "load_rules_file",
    "matches",
    "might_match",
    "needs_lead",
    "needs_lead_state",
    "parse_due",
    "parse_rules",
    "plan_actions",
    "read_rules_text",
    "render",
    "rule_changes",
    "rule_summaries",
    "task_changes",
    "template_fields",
    "template_values",
    "trigger_of",
]
