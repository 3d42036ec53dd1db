"""Rules that would move leads in a circle, found before they run.

A move a rule makes comes back as a webhook and an events-log entry like any other change
(amoCRM's docs, crm_platform/leads-api: API changes are recorded as events), so rule A moving a
lead to stage S where rule B moves it back to A's stage would run forever. `rules check` refuses
such a cycle when the file shows it (stages named); what conditions or other programs might close
is left to the run-time guard (``amohook.rules.guard``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # compile_rules calls cycle_problems: a run-time import back would be a cycle
    from amohook.rules.compile import CompiledRule


def _moves(rule: CompiledRule) -> list[tuple[int | None, int]]:
    """The (pipeline, stage) pairs a rule moves leads to."""
    from amohook.actions import kinds

    registry = kinds()
    out = []
    for kind_name, action in rule.actions:
        target = registry[kind_name].moves_to(action, rule)
        if target is not None:
            out.append(target)
    return out


def _fires_on_entering(rule: CompiledRule, target: tuple[int | None, int], came_from: CompiledRule) -> bool:
    """Would ``rule`` fire when a lead enters ``target`` because ``came_from`` moved it there?"""
    if rule.spec.when != "lead.stage_changed":
        return False
    pipeline, stage = target
    if rule.pipeline_id is not None and pipeline is not None and rule.pipeline_id != pipeline:
        return False
    if rule.to_stage_id is not None and rule.to_stage_id != stage:
        return False
    if (
        rule.from_stage_id is not None
        and came_from.spec.when == "lead.stage_changed"
        and (came_from.to_stage_id is not None and came_from.to_stage_id != rule.from_stage_id)
    ):
        return False
    return True


def cycle_problems(rules: list[CompiledRule]) -> list[str]:
    """One problem per cycle of rule-made moves the file shows."""
    movers = [r for r in rules if _moves(r)]
    edges: dict[str, list[str]] = {r.name: [] for r in movers}
    problems = []
    for rule in movers:
        for target in _moves(rule):
            if (
                rule.spec.when == "lead.stage_changed"
                and rule.to_stage_id == target[1]
                and (rule.pipeline_id in (None, target[0]))
            ):
                problems.append(f"rule '{rule.name}': moves the lead to the stage that triggers it")
                continue
            for other in movers:
                if other is rule and other.to_stage_id is None:
                    continue  # fires on its own move, moves to where the lead already is: ends there
                if _fires_on_entering(other, target, rule):
                    edges[rule.name].append(other.name)
    seen: set[str] = set()
    reported: set[frozenset] = set()
    for start in edges:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    cycle = frozenset(path)
                    if cycle not in reported:
                        reported.add(cycle)
                        chain = " → ".join(f"'{n}'" for n in [*path, start])
                        problems.append(
                            f"rules {chain} move leads in a circle — give one of them a from_stage the other's "
                            "move does not leave, or drop one of the moves"
                        )
                elif nxt not in path and nxt not in seen:
                    stack.append((nxt, [*path, nxt]))
        seen.add(start)
    return problems
