"""Store behaviour that every backend must share."""

from __future__ import annotations

import threading
import time

import pytest

from amohook.store import open_store
from amohook.store.models import Event
from tests.conftest import make_database


@pytest.fixture(params=["mysql", "postgres"])
def server_store(request, tmp_path):
    """Row-locking backends only: on SQLite a claim holds the one write lock by design."""
    url, drop = make_database(request.param, tmp_path)
    store = open_store(url)
    yield store
    store.close()
    drop()


def test_an_open_claim_does_not_hold_up_new_events(server_store):
    """A worker's claim (FOR UPDATE SKIP LOCKED over pending events) must not block the listener's
    inserts — on MySQL/MariaDB's default REPEATABLE READ its gap locks would."""
    store = server_store
    rows = [dict(delivery_id=i, idx=0, entity="leads", action="status", status="done", data="{}") for i in range(300)]
    Event.insert_many(rows).execute()
    Event.insert(delivery_id=1000, idx=0, entity="leads", action="status", status="pending", data="{}").execute()
    claimed = threading.Event()
    release = threading.Event()

    def claim():
        now = time.time()
        with store.write():
            due = ((Event.status == "pending") & (Event.next_attempt_at <= now)) | (
                (Event.status == "running") & (Event.lease_until < now)
            )
            list(store.for_update(Event.select(Event.id).where(due).order_by(Event.id).limit(10), skip_locked=True))
            claimed.set()
            release.wait(10)

    worker = threading.Thread(target=claim)
    worker.start()
    try:
        assert claimed.wait(10)
        start = time.monotonic()
        Event.insert(
            delivery_id=1001,
            idx=0,
            entity="leads",
            action="add",
            status="pending",
            next_attempt_at=time.time() + 5,
            data="{}",
        ).execute()
        elapsed = time.monotonic() - start
    finally:
        release.set()
        worker.join(15)
    assert elapsed < 1.0, f"the insert waited {elapsed:.2f} s behind an open claim"
