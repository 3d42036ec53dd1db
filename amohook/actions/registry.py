"""The kinds of action rules can take, by the name of their table in the rules file.

Adding a kind is one module with one ``ActionKind`` subclass, listed here; nothing else names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amohook.actions.base import ActionKind


@lru_cache(maxsize=1)
def kinds() -> Mapping[str, ActionKind]:
    """Every action kind, by name (the ``[rule.<name>]`` table and ``Action.kind``), in file order."""
    from amohook.actions.field import SetField
    from amohook.actions.move import MoveLead
    from amohook.actions.note import AddNote
    from amohook.actions.notify import Notify
    from amohook.actions.task import CreateTask

    every: tuple[ActionKind, ...] = (CreateTask(), AddNote(), MoveLead(), SetField(), Notify())
    return {k.name: k for k in every}


def kind_names() -> frozenset[str]:
    return frozenset(kinds())


def lead_changing_kinds() -> list[str]:
    """The kinds whose effect is a change of the lead (counted by the loop guard)."""
    return [name for name, kind in kinds().items() if kind.changes_lead]


def created_kinds() -> list[str]:
    """The kinds whose effect is something amoCRM creates (the status page lists those done today)."""
    return [name for name, kind in kinds().items() if kind.creates]


def noun(kind_name: str) -> str:
    """What an action of this kind makes, in a word ("task", "note", …), for listings."""
    kind = kinds().get(kind_name)
    return kind.noun if kind else kind_name
