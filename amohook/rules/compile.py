"""Rules compiled against the synced store: names → ids, every miss reported with suggestions.

The rule's own names (pipeline, stages, the trigger's task type, condition fields) are resolved
here; each action resolves its own through ``CompileContext`` (``amohook.actions``). Then the
rules that move leads are checked for cycles a file can show (``amohook.rules.cycles``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amohook.rules.spec import RulesError, RuleSpec, load_rules_file


@dataclass(frozen=True)
class CompiledRule:
    spec: RuleSpec
    account: str
    pipeline_id: int | None
    pipeline_name: str | None
    to_stage_id: int | None
    from_stage_id: int | None
    stage_names: dict = field(default_factory=dict, compare=False)  # (pipeline_id, status_id) -> name
    user_names: dict = field(default_factory=dict, compare=False)  # user id -> name
    field_ids: dict = field(default_factory=dict, compare=False)  # condition field -> custom field id or None
    actions: tuple = ()  # ((kind name, compiled action), ...)
    stage_id: int | None = None  # task.completed: the stage the lead must be in
    task_type_id: int | None = None  # task.completed: the completed task's type

    @property
    def name(self) -> str:
        return self.spec.name

    def action(self, kind: str):
        """The compiled action of this kind, or None."""
        return next((c for k, c in self.actions if k == kind), None)


@dataclass
class CompileContext:
    """What an action kind may resolve names against: one account's synced catalogue."""

    account: str
    catalog: Any  # amohook.lookup.Catalog
    pipeline: Any  # the rule's Pipeline row, or None
    fields_by_id: dict
    fields_by_name: dict
    field_names: list
    timezone: str | None
    env: Mapping[str, str]
    rule: RuleSpec


def compile_rules(
    specs: list[RuleSpec], accounts: list[str], path: str = "rules", *, env: Mapping[str, str] | None = None
) -> list[CompiledRule]:
    """Resolve names to ids through the synced store; every miss is reported with suggestions.

    ``env``: where actions read what a rules file only names (``notify``'s ``url_env``); this
    process's environment unless given.
    """
    from amohook import lookup
    from amohook.actions import kinds
    from amohook.rules.cycles import cycle_problems
    from amohook.store.models import Account, CustomField, Stage, User

    registry = kinds()
    problems: list[str] = []
    compiled: list[CompiledRule] = []
    catalogs: dict[str, lookup.Catalog] = {}
    shared: dict[str, tuple] = {}
    for spec in specs:
        label = f"rule '{spec.name}'"
        if spec.account:
            if spec.account not in accounts:
                problems.append(
                    f"{label}: no account '{spec.account}' in the store (have: {', '.join(accounts) or 'none'})"
                )
                continue
            account = spec.account
        elif len(accounts) == 1:
            account = accounts[0]
        else:
            problems.append(
                f"{label}: "
                + (
                    "no account in the store — run `amohook init-auth`"
                    if not accounts
                    else f'several accounts are stored; add account = "…" ({", ".join(accounts)})'
                )
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
            row = Account.get_or_none(Account.subdomain == account)
            shared[account] = (
                {(s.pipeline_id, s.amo_id): s.name for s in Stage.select().where(Stage.account == account)},
                {u.amo_id: u.name for u in User.select().where(User.account == account)},
                (by_id, by_name),
                [f.name for f in fields],
                row.timezone if row else None,
            )
        stage_names, user_names, (field_by_id, field_by_name), field_names, tz = shared[account]
        try:
            pipeline = catalog.pipeline(spec.pipeline) if spec.pipeline is not None else None
            to_stage = catalog.stage(pipeline, spec.to_stage) if spec.to_stage is not None else None
            from_stage = catalog.stage(pipeline, spec.from_stage) if spec.from_stage is not None else None
            stage = catalog.stage(pipeline, spec.stage) if spec.stage is not None else None
        except lookup.LookupFailed as exc:
            problems.append(f"{label}: {exc.message}")
            continue
        task_type_id = None
        if spec.task_type is not None:
            try:
                task_type_id = catalog.task_type(spec.task_type).amo_id
            except lookup.LookupFailed as exc:
                problems.append(f"{label}: task_type: {exc.message}")
        field_ids = {}
        for cond in spec.conditions:
            match = field_by_id.get(str(cond.field)) or field_by_name.get(lookup.normalize(str(cond.field)))
            if field_names and match is None:
                close = lookup.suggest(str(cond.field), field_names)
                hint = f" — did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                problems.append(f"{label}: no lead custom field '{cond.field}'{hint}")
            field_ids[cond.field] = match.amo_id if match else None
        ctx = CompileContext(
            account,
            catalog,
            pipeline,
            field_by_id,
            field_by_name,
            field_names,
            tz,
            env if env is not None else os.environ,
            spec,
        )
        actions = []
        for kind_name, action_spec in spec.actions:
            actions.append(
                (kind_name, registry[kind_name].compile(action_spec, ctx, f"{label}: {kind_name}", problems))
            )
        compiled.append(
            CompiledRule(
                spec=spec,
                account=account,
                pipeline_id=pipeline.amo_id if pipeline else None,
                pipeline_name=pipeline.name if pipeline else None,
                to_stage_id=to_stage.amo_id if to_stage else None,
                from_stage_id=from_stage.amo_id if from_stage else None,
                stage_names=stage_names,
                user_names=user_names,
                field_ids=field_ids,
                actions=tuple(actions),
                stage_id=stage.amo_id if stage else None,
                task_type_id=task_type_id,
            )
        )
    if not problems:
        problems.extend(cycle_problems(compiled))
    if problems:
        raise RulesError(path, problems)
    return compiled


def rule_summaries(rules: Iterable[CompiledRule]) -> list[dict]:
    """The compiled rules as plain data (``rules check --json``)."""
    from amohook.actions import kinds

    registry = kinds()
    out = []
    for r in rules:
        summary = {
            "name": r.name,
            "when": r.spec.when,
            "account": r.account,
            "pipeline_id": r.pipeline_id,
            "to_stage_id": r.to_stage_id,
            "from_stage_id": r.from_stage_id,
            "actions": [k for k, _ in r.actions],
        }
        if r.spec.when == "task.completed":
            summary.update(stage_id=r.stage_id, trigger_task_type_id=r.task_type_id)
        if r.spec.when == "lead.stale":
            summary.update(stage_id=r.stage_id, after_seconds=r.spec.after)
        for kind_name, action in r.actions:
            summary.update(registry[kind_name].summary(action))
        out.append(summary)
    return out


def describe_actions(rule: CompiledRule) -> str:
    """What a rule does, in a few words (``rules check``)."""
    from amohook.actions import kinds

    registry = kinds()
    return " and ".join(registry[k].describe(a, rule) for k, a in rule.actions)


def load_and_compile(path: str | Path, *, env: Mapping[str, str] | None = None) -> list[CompiledRule]:
    """Read, check and compile a rules file against the store; ``RulesError`` lists every problem."""
    from amohook.store.models import Account

    specs = load_rules_file(path)
    accounts = [a.subdomain for a in Account.select(Account.subdomain).order_by(Account.subdomain)]
    return compile_rules(specs, accounts, str(path), env=env)
