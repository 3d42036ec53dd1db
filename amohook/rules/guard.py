"""The run-time stop for chains of rule-made changes to one lead.

A lead a rule moves or edits comes back as a change; rules the file cannot show to be circular
(conditions, two files, another integration reacting) could still feed each other. So at most
``MAX_CHANGES`` rule-made changes of one lead are recorded within ``WINDOW`` seconds; beyond that
an action is recorded as ``skipped`` with the reason, and the log says so.
"""

from __future__ import annotations

from collections.abc import Sequence

from amohook.store.models import Action

MAX_CHANGES = 5
WINDOW = 600.0


def recent_changes(account: str, lead_id: int, kinds: list[str], now: float, *, exclude: Sequence[str] = ()) -> int:
    """Rule-made changes of this lead recorded in the window (skipped ones do not count)."""
    query = Action.select().where(
        (Action.account == account)
        & Action.kind.in_(kinds)
        & (Action.result_id == lead_id)
        & (Action.created_at >= now - WINDOW)
        & (Action.status != "skipped")
    )
    if exclude:
        query = query.where(Action.key.not_in(list(exclude)))
    return query.count()


def stop_reason(count: int) -> str | None:
    """Why an action is not sent, when ``count`` rule-made changes came before it; else None."""
    if count < MAX_CHANGES:
        return None
    return (
        f"loop guard: rules already changed this lead {count} times in {int(WINDOW // 60)} minutes — "
        "a chain of rules feeding each other? check the rules' stages and conditions"
    )
