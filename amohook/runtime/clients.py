"""The amoCRM clients of one supervisor, made on first use and counted for /metrics.

Every client of an account shares amoCRM's rate limit through the store (``client_for``); the
pool keeps the ones this process made so that the status page can say how many requests each
account got, and how many 429s, without a module-global counter.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from amohook.amocrm.client import AmoClient
    from amohook.store import Store


class ClientPool:
    """One client per (account, attempts), shared by the loops that ask for it."""

    def __init__(self, store: Store, factory: Callable[..., AmoClient] | None = None):
        self.store = store
        self._factory = factory
        self._clients: dict[tuple[str, int], AmoClient] = {}
        self._lock = threading.Lock()

    def get(self, account: str, *, max_attempts: int) -> AmoClient:
        """The client for ``account`` whose requests are tried ``max_attempts`` times."""
        key = (account, max_attempts)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                if self._factory is not None:
                    client = self._factory(self.store, account, max_attempts=max_attempts)
                else:
                    from amohook.amocrm.client import client_for

                    client = client_for(self.store, account, max_attempts=max_attempts)
                self._clients[key] = client
        return client

    def health(self) -> dict[str, Any]:
        """Per account: requests sent to amoCRM and 429s answered, by this pool's clients."""
        with self._lock:
            clients = list(self._clients.items())
        accounts: dict[str, dict[str, int]] = {}
        for (account, _), client in clients:
            figures = accounts.setdefault(account, {"requests": 0, "rate_limited": 0})
            figures["requests"] += client.requests_made
            figures["rate_limited"] += client.rate_limited
        return accounts
