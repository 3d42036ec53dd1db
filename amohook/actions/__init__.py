"""What rules do, carried out once: the kinds of action and the sender that dispatches by kind.

``registry.kinds()`` lists every kind (one module each: ``task``, ``note``, ``move``, ``field``,
``notify``; the protocol is ``base.ActionKind``); ``sender.ActionSender`` claims recorded actions
and hands each batch to its kind.
"""

from amohook.actions.registry import kind_names, kinds, lead_changing_kinds, noun
from amohook.actions.sender import (
    BATCH_SIZE,
    ActionSender,
    SendStats,
    record_planned,
)

__all__ = [
    "BATCH_SIZE",
    "ActionSender",
    "SendStats",
    "kind_names",
    "kinds",
    "lead_changing_kinds",
    "noun",
    "record_planned",
]
