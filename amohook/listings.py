"""What `amohook pipelines`, `task-types` and `users` list: the reference data a sync stored for
one account, in the order people read it. Read from the store only (run `sync-entities` first)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from amohook.store.models import Pipeline, Stage, TaskType, User

if TYPE_CHECKING:
    from amohook.store import Store


@dataclass(frozen=True)
class PipelineStages:
    """A pipeline and its stages (amoCRM calls them statuses), in amoCRM's sort order."""

    pipeline: Pipeline
    stages: list[Stage] = field(default_factory=list)


def pipelines(store: Store, account: str) -> list[PipelineStages]:
    """The account's pipelines with their stages, as amoCRM sorts them."""
    rows = list(Pipeline.select().where(Pipeline.account == account).order_by(Pipeline.sort, Pipeline.amo_id))
    stages: dict[int, list[Stage]] = {}
    for stage in Stage.select().where(Stage.account == account).order_by(Stage.sort, Stage.amo_id):
        stages.setdefault(stage.pipeline_id, []).append(stage)
    return [PipelineStages(p, stages.get(p.amo_id, [])) for p in rows]


def task_types(store: Store, account: str) -> list[TaskType]:
    """The account's task types, by id."""
    return list(TaskType.select().where(TaskType.account == account).order_by(TaskType.amo_id))


def users(store: Store, account: str) -> list[User]:
    """The account's users (synced only with an admin's token), by name."""
    return list(User.select().where(User.account == account).order_by(User.name, User.amo_id))
