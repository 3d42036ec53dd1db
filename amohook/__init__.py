"""amohook keeps an amoCRM (Kommo) integration alive: tokens, reference data and webhooks.

The names below are imported on first use (PEP 562), so ``import amohook`` — and every CLI
command that needs none of them, like the `refresh-token` cron runs — stays cheap::

    from amohook import Supervisor, open_store, stop_on_signals
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"  # the one version string: pyproject.toml reads it
__url__ = "https://github.com/amohook/amohook"  # the project page: metadata and the User-Agent

# public name -> the module that defines it
_EXPORTS = {
    "Supervisor": "amohook.runtime.supervisor",
    "StopEvent": "amohook.runtime.loop",
    "build_registry": "amohook.runtime.supervisor",
    "stop_on_signals": "amohook.runtime.supervisor",
    "Store": "amohook.store",
    "open_store": "amohook.store",
    "ServerConfig": "amohook.webhooks.server",
    "InboxEvent": "amohook.inbox",
    "HandlerContext": "amohook.worker",
    "PermanentError": "amohook.errors",
    "AmohookError": "amohook.errors",
    "ConfigError": "amohook.errors",
    "ExitCode": "amohook.errors",
    "needs_person": "amohook.errors",
}

__all__ = ["__url__", "__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'amohook' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
