"""What ``GET /healthz`` answers, from memory: the writer's own record of its commits and queue
figures read by one thread of its own.

A monitor polls /healthz, sometimes from many places at once; if each request read the database,
150 of them would hold 150 connections (a PostgreSQL server has 100 by default). So no request
touches the database here: the group-commit writer keeps how its last commits went
(``GroupCommitter.health``), and ``QueueWatch`` reads the queue's counts on its own connection,
at most once a second, when someone asks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from amohook import inbox
from amohook.ops.reader import OnDemandReader

if TYPE_CHECKING:
    from amohook.store import Store

log = logging.getLogger("amohook.server")

FRESH_SECONDS = 1.0  # queue figures older than this are read again when /healthz is asked
WAIT_SECONDS = 0.5  # how long a /healthz request waits for that read before answering with what it has


@dataclass(frozen=True)
class HealthFigures:
    stats: inbox.QueueStats
    reconciliation: list[dict]


class QueueWatch:
    """Queue counts (and reconciliation per account) for /healthz, read by one thread on one
    connection, at most once a second, shared by every request (``reader.OnDemandReader``)."""

    def __init__(self, store: Store):
        self.store = store
        self.reader: OnDemandReader[HealthFigures] = OnDemandReader(
            store,
            self._figures,
            name="amohook-health",
            what="healthz",
            fresh=FRESH_SECONDS,
            wait=WAIT_SECONDS,
            logger=log,
            keep_last=False,
        )
        self._reconciliation: list[dict] = []

    def start(self) -> QueueWatch:
        self.reader.start()
        return self

    def stop(self) -> None:
        self.reader.stop(2.0)

    @property
    def reconciliation(self) -> list[dict]:
        """Per account: the last reconciliation pass, the cursor's lag, changes recovered in 24 h,
        the subscription state — as of the last good read."""
        return list(self._reconciliation)

    def snapshot(self) -> tuple[inbox.QueueStats | None, str | None, float]:
        """(stats, error class, age in seconds); asks for a new read when they are stale."""
        figures, error, age = self.reader.get()
        if figures is not None:
            self._reconciliation = figures.reconciliation
        return (figures.stats if figures else None), error, age

    def _figures(self) -> HealthFigures:
        now = time.time()
        return HealthFigures(inbox.queue_stats(self.store, now=now), _reconciliation(now))


def _reconciliation(now: float) -> list[dict]:
    from amohook.recovery.reconcile import reconcile_status
    from amohook.store.models import Account

    rows = []
    for account in Account.select(Account.subdomain).order_by(Account.subdomain).limit(50):
        st = reconcile_status(account.subdomain, now)
        rows.append(
            {
                "account": st.account,
                "last_pass_age": None if st.last_pass_at is None else round(now - st.last_pass_at, 1),
                "cursor_lag": None if st.lag is None else round(st.lag),
                "recovered_24h": st.recovered_24h,
                "subscription": st.subscription,
                "last_error": bool(st.last_error),
            }
        )
    return rows


def answer(committer: inbox.GroupCommitter, watch: QueueWatch, *, connections: int) -> tuple[int, dict]:
    """(HTTP status, JSON payload): 503 "degraded" while commits fail, 503 "error" while the
    database cannot be read, else 200 "ok". Only failure classes, never a driver's message."""
    commits = committer.health()
    stats, read_error, age = watch.snapshot()
    status, code = "ok", 200
    if commits.failing:
        status, code = "degraded", 503
    elif read_error is not None:
        status, code = "error", 503
    now = time.time()
    payload = {
        "status": status,
        "commits": f"failing: {commits.failure}" if commits.failing else "ok",
        "database": f"error: {read_error}" if read_error else "ok",
        "failing_for": None if commits.failing_since is None else round(now - commits.failing_since, 1),
        "failed_batches": commits.failed_batches,
        "last_commit_age": None if commits.last_ok_at is None else round(now - commits.last_ok_at, 1),
        "queue_depth": None if stats is None else stats.pending + stats.running,
        "pending": None if stats is None else stats.pending,
        "due": None if stats is None else stats.due,
        "running": None if stats is None else stats.running,
        "dead": None if stats is None else stats.dead,
        "oldest_pending_age": None
        if stats is None or stats.oldest_pending_age is None
        else round(stats.oldest_pending_age, 3),
        "queue_read_age": round(age, 1),
        "writer_queue": committer.queued(),
        "connections": connections,
        "reconciliation": watch.reconciliation,
    }
    return code, payload
