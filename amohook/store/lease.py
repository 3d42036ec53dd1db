"""Named leases: a cross-process lock that works the same on SQLite, MySQL and PostgreSQL.

A lease is claimed by a single atomic UPDATE that succeeds only when the lease is free or expired,
so no transaction is held while the holder works (on SQLite a held write transaction would stall
the webhook listener). A holder that dies simply lets its lease run out.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Callable

from peewee import IntegrityError

from amohook.errors import LockBusy
from amohook.store.models import Lease

_local_owner = f"{socket.gethostname()}:{os.getpid()}"


def new_owner() -> str:
    """A token unique to this holder (host, pid, thread, random) so only it can release."""
    return f"{_local_owner}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"


def try_acquire(name: str, owner: str, ttl: float, clock: Callable[[], float] = time.time) -> bool:
    now = clock()
    try:
        Lease.insert(name=name, owner=None, expires_at=0).on_conflict_ignore().execute()
    except IntegrityError:  # a racing insert on a backend without ON CONFLICT semantics
        pass
    claimed = (
        Lease.update(owner=owner, expires_at=now + ttl)
        .where((Lease.name == name) & ((Lease.owner.is_null()) | (Lease.expires_at < now)))
        .execute()
    )
    return claimed == 1


def release(name: str, owner: str) -> None:
    Lease.update(owner=None, expires_at=0).where((Lease.name == name) & (Lease.owner == owner)).execute()


def holder(name: str, clock: Callable[[], float] = time.time) -> str | None:
    row = Lease.get_or_none(Lease.name == name)
    if row is None or row.owner is None or row.expires_at < clock():
        return None
    return row.owner


@contextmanager
def lease(
    name: str,
    *,
    ttl: float,
    wait: float,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
):
    """Hold lease ``name`` for the block; wait up to ``wait`` seconds for it, else ``LockBusy``."""
    owner = new_owner()
    deadline = time.monotonic() + wait
    delay = 0.02
    while not try_acquire(name, owner, ttl, clock):
        if time.monotonic() >= deadline:
            raise LockBusy(
                f"another amohook process holds the '{name}' lock (it expires within {ttl:.0f} s "
                "if that process died) — try again shortly"
            )
        sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 1.5, 0.25)
    try:
        yield owner
    finally:
        release(name, owner)
