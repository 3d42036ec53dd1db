"""The kinds of action rules can take, by the name of their table in the rules file.

Adding a kind is one module with one ``ActionKind`` subclass, listed here; nothing else names it.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def kinds() -> dict:
    """Every action kind, by name (the ``[rule.<name>]`` table and ``Action.kind``), in file order."""
    from amohook.actions.field import SetField
    from amohook.actions.move import MoveLead
    from amohook.actions.note import AddNote
    from amohook.actions.notify import Notify
    from amohook.actions.task import CreateTask

    return {k.name: k for k in (CreateTask(), AddNote(), MoveLead(), SetField(), Notify())}


def kind_names() -> frozenset:
    return frozenset(kinds())


def lead_changing_kinds() -> list[str]:
    """The kinds whose effect is a change of the lead (counted by the loop guard)."""
    return [name for name, kind in kinds().items() if kind.changes_lead]


def noun(kind_name: str) -> str:
    """What an action of this kind makes, in a word ("task", "note", …), for listings."""
    kind = kinds().get(kind_name)
    return kind.noun if kind else kind_name
