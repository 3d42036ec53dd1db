"""What rules do, carried out once: the kinds of action and the sender that dispatches by kind.

``registry.kinds()`` lists every kind (one module each: ``task``, ``note``, ``move``, ``field``,
``notify``; the protocol is ``base.ActionKind``); ``sender.ActionSender`` claims recorded actions
and hands each batch to its kind.

The names below load on first use (PEP 562): importing ``amohook.actions.registry`` (a listing's
"task"/"note" nouns) must not bring in the sender and, with it, ``requests``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from amohook.actions.registry import kind_names, kinds, lead_changing_kinds, noun
    from amohook.actions.sender import (
        BATCH_SIZE,
        ActionSender,
        SendStats,
        record_planned,
    )

_EXPORTS = {
    **dict.fromkeys(("kind_names", "kinds", "lead_changing_kinds", "noun"), "amohook.actions.registry"),
    **dict.fromkeys(
        ("BATCH_SIZE", "ActionSender", "SendStats", "record_planned"),
        "amohook.actions.sender",
    ),
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'amohook.actions' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
