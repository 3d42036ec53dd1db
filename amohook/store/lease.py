"""Named leases: a cross-process lock that works the same on SQLite, MySQL and PostgreSQL.

A lease is claimed by a single atomic UPDATE that succeeds only when the lease is free or expired,
so no transaction is held while the holder works (on SQLite a held write transaction would stall
the webhook listener). A holder that dies simply lets its lease run out.

Expiry times are the database server's clock on MySQL/PostgreSQL, not the caller's: hosts whose
clocks disagree by minutes share one store, and a host running ahead would otherwise see every
other host's lease as expired and take it while it is still in use.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager

import peewee
from peewee import IntegrityError

from amohook.errors import LockBusy
from amohook.store.models import Lease
from amohook.times import human_time

_local_owner = f"{socket.gethostname()}:{os.getpid()}"
# A normal wait (another process refreshing) takes well under a second; say why only past this.
NOTICE_AFTER = 2.0


def new_owner() -> str:
    """A token unique to this holder (host, pid, thread, random) so only it can release."""
    return f"{_local_owner}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"


def db_time() -> float:
    """The database server's clock (Unix seconds); this host's for SQLite, which is local anyway."""
    db = Lease._meta.database
    db = getattr(db, "obj", db)
    if isinstance(db, peewee.MySQLDatabase):
        return float(db.execute_sql("SELECT UNIX_TIMESTAMP(NOW(6))").fetchone()[0])
    if isinstance(db, peewee.PostgresqlDatabase):
        return float(db.execute_sql("SELECT EXTRACT(EPOCH FROM clock_timestamp())").fetchone()[0])
    return time.time()


def try_acquire(name: str, owner: str, ttl: float, clock: Callable[[], float] | None = None) -> bool:
    now = (clock or db_time)()
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


def renew(name: str, owner: str, ttl: float) -> bool:
    """Extend a lease this owner still holds (by the database's clock); False when it was lost."""
    return Lease.update(expires_at=db_time() + ttl).where((Lease.name == name) & (Lease.owner == owner)).execute() == 1


def release(name: str, owner: str) -> None:
    Lease.update(owner=None, expires_at=0).where((Lease.name == name) & (Lease.owner == owner)).execute()


def holder(name: str, clock: Callable[[], float] | None = None) -> str | None:
    info = holder_info(name, clock)
    return info[0] if info else None


def holder_info(name: str, clock: Callable[[], float] | None = None) -> tuple[str, float] | None:
    """(owner, seconds until the lease runs out) of a live lease, or None when it is free or expired."""
    row = Lease.get_or_none(Lease.name == name)
    now = (clock or db_time)()
    if row is None or row.owner is None or row.expires_at < now:
        return None
    return row.owner, row.expires_at - now


def owner_gone(owner: str) -> bool:
    """True when ``owner`` names a process on this host that no longer runs (killed, crashed).

    Only said of this host's processes, and only used to stop waiting, never to take a lease:
    another machine (or a container with its own process numbers) may share the host name.
    """
    host, _, rest = owner.partition(":")
    pid = rest.split(":", 1)[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def describe_busy(name: str, doing: str, clock: Callable[[], float] | None = None) -> str:
    """Who holds lease ``name`` and until when, in one line: "another amohook process (host:pid) is
    pruning; its 'prune' lease runs out at T", or that the holder is a dead process of this host."""
    info = holder_info(name, clock)
    if info is None:  # released (or run out) just now
        return f"another amohook process was {doing} a moment ago"
    other, left = info
    who, until = other.rsplit(":", 2)[0], human_time(time.time() + left)
    if owner_gone(other):
        return (
            f"the '{name}' lease is held until {until} by process {who.split(':', 1)[1]} of this host, "
            "which is no longer running (killed?); it runs out then"
        )
    return f"another amohook process ({who}) is {doing}; its '{name}' lease runs out at {until}"


@contextmanager
def lease(
    name: str,
    *,
    ttl: float,
    wait: float,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_wait: Callable[[str], None] | None = None,
):
    """Hold lease ``name`` for the block; wait up to ``wait`` seconds for it, else ``LockBusy``.

    When the lease is taken, ``on_wait`` hears at once whom we wait for and until when. A holder
    that is a dead process of this host cannot release it, so waiting is pointless: ``LockBusy``
    at once, naming when the lease runs out.
    """
    owner = new_owner()
    started = time.monotonic()
    deadline = started + wait
    delay = 0.02
    checked = told = False
    while not try_acquire(name, owner, ttl, clock):
        now = time.monotonic()
        expired = now >= deadline
        tell = not told and now - started >= NOTICE_AFTER and on_wait is not None
        info = holder_info(name, clock) if (not checked or tell or expired) else None
        if info is not None and not checked:
            checked = True
            other, left = info
            if owner_gone(other):
                raise LockBusy(
                    f"the '{name}' lease is held until {human_time(time.time() + left)} by process "
                    f"{other.split(':')[1]} of this host, which is no longer running — try again after that time"
                )
        if info is not None and tell and on_wait is not None:
            told = True
            on_wait(
                f"waiting up to {wait:.0f} s for the '{name}' lease, held by "
                f"{info[0].rsplit(':', 2)[0]} until {human_time(time.time() + info[1])}"
            )
        if expired:
            until = f" until {human_time(time.time() + info[1])}" if info else ""
            raise LockBusy(
                f"another amohook process holds the '{name}' lease{until} (if it died, the lease "
                "runs out then) — try again later"
            )
        sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 1.5, 0.25)
    try:
        yield owner
    finally:
        release(name, owner)
