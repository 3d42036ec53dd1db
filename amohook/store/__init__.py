"""The store: every piece of state amohook keeps, in one database reached by URL."""

from amohook.store.db import Store
from amohook.store.open import open_store

__all__ = ["Store", "open_store"]
