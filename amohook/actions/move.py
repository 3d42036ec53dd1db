"""``[rule.move_lead]``: move the lead to another stage (PATCH /api/v4/leads, in batches).

Idempotent by state, not by creation: before a repeat the lead is read; already in the target
stage → done; moved elsewhere since the change that planned the move → skipped, and the action
says so. The body sends ``status_id`` and ``pipeline_id`` both (142/143 exist in every pipeline)
and nothing else (crm_platform/leads-api, "Редактирование сделок").
"""

from __future__ import annotations

from dataclasses import dataclass

from amohook.actions.base import LeadPatchKind, PlannedAction, action_key
from amohook.rules.changes import as_int

UNSORTED = 1  # a stage of type 1 ("Неразобранное") is no target: amoCRM refuses it (NotSupportedChoice)


@dataclass(frozen=True)
class MoveSpec:
    to_stage: str | int
    pipeline: str | int | None = None


@dataclass(frozen=True)
class CompiledMove:
    pipeline_id: int
    status_id: int
    stage_name: str


class MoveLead(LeadPatchKind):
    name = "move_lead"
    noun = "move"
    keys = frozenset({"to_stage", "pipeline"})
    key_suffix = "|move_lead"

    def parse(self, raw, label, problems):
        self.unknown_keys(raw, label, problems)
        to_stage = raw.get("to_stage")
        if not isinstance(to_stage, (str, int)) or isinstance(to_stage, bool) or to_stage == "":
            problems.append(f'{label} needs to_stage = "stage name or id"')
            to_stage = ""
        pipeline = raw.get("pipeline")
        if pipeline is not None and (not isinstance(pipeline, (str, int)) or isinstance(pipeline, bool)):
            problems.append(f"{label}: pipeline must be a name or an id")
            pipeline = None
        return MoveSpec(to_stage=to_stage, pipeline=pipeline)

    def compile(self, spec, ctx, label, problems):
        from amohook import lookup

        try:
            pipeline = ctx.catalog.pipeline(spec.pipeline) if spec.pipeline is not None else ctx.pipeline
            if pipeline is None:
                problems.append(f'{label}: which pipeline? set pipeline = "…" on the rule or in [rule.move_lead]')
                return None
            stage = ctx.catalog.stage(pipeline, spec.to_stage)
        except lookup.LookupFailed as exc:
            problems.append(f"{label}: {exc.message}")
            return None
        if stage.type == UNSORTED:
            problems.append(f"{label}: '{stage.name}' is the unsorted stage — amoCRM does not move leads there")
            return None
        return CompiledMove(pipeline.amo_id, stage.amo_id, stage.name)

    def describe(self, compiled, rule):
        return f"move to {compiled.stage_name!r}" if compiled else "move"

    def summary(self, compiled):
        return {"move_to": [compiled.pipeline_id, compiled.status_id]} if compiled else {}

    def moves_to(self, compiled, rule):
        return (compiled.pipeline_id, compiled.status_id) if compiled else None

    def plan(self, rule, compiled, change, ctx):
        if compiled is None:
            return None
        lead = ctx.lead or {}
        pipeline = change.pipeline_id or as_int(lead.get("pipeline_id"))
        status = change.status_id or as_int(lead.get("status_id"))
        if (pipeline, status) == (compiled.pipeline_id, compiled.status_id):
            return f"lead {change.lead_id} is already in stage {compiled.stage_name!r}; not moved"
        key = action_key(rule, change, ctx.fallback, self.key_suffix)
        patch = {
            "id": change.lead_id,
            "status_id": compiled.status_id,
            "pipeline_id": compiled.pipeline_id,
            "request_id": key[:32],
        }
        start = [pipeline, status] if pipeline and status else None
        return PlannedAction(
            key=key,
            rule=rule.name,
            account=rule.account,
            lead_id=change.lead_id,
            payload={"patch": patch, "from": start},
            kind=self.name,
            target_id=change.lead_id,
        )

    def state(self, lead, payload):
        patch, start = payload["patch"], payload.get("from")
        now = [as_int(lead.get("pipeline_id")), as_int(lead.get("status_id"))]
        if now == [patch["pipeline_id"], patch["status_id"]]:
            return "done", f"lead {patch['id']} is already in the target stage: nothing sent again"
        if start is not None and now != start:
            return "skip", (
                f"lead {patch['id']} was moved elsewhere since the change (now stage {now[1]} of "
                f"pipeline {now[0]}): not moved"
            )
        return "send", None
