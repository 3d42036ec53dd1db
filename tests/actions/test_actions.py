"""Exactly-once, batched task creation against the fake amoCRM, on every backend."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import pytest

from amohook.actions import ActionSender, kinds, record_planned
from amohook.actions.base import PlannedAction
from amohook.amocrm.client import client_for
from amohook.store.models import Action
from tests.conftest import ROOT, cli_env
from tests.helpers.actions import (
    CRASHING_SENDER,
    RESPONSIBLE,
    TASK_TYPE,
    Clock,
    planned,
    planned_note,
    quick_sender,
    sender,
)


def tasks_for(fake, lead_id):
    return [t for t in fake.tasks.values() if t.get("entity_id") == lead_id]


def test_recording_the_same_plan_twice_keeps_one_action(store, account):
    assert record_planned(store, [planned(1), planned(2)], event_id=1) == 2
    assert record_planned(store, [planned(1), planned(2), planned(3)], event_id=2) == 1
    assert Action.select().count() == 3


def test_pending_tasks_are_sent_in_batches_each_with_its_own_outcome(store, fake, account):
    record_planned(store, [planned(i) for i in range(1, 121)], event_id=1)
    s = sender(store)
    assert s.drain() == 120
    posts = fake.requests_to("/api/v4/tasks", "POST")
    assert [len(r.json) for r in posts] == [50, 50, 20]
    assert len(fake.tasks) == 120
    done = list(Action.select().where(Action.status == "done"))
    assert len(done) == 120
    assert {a.result_id for a in done} == set(fake.tasks)
    for a in done:
        assert fake.tasks[a.result_id]["entity_id"] == json.loads(a.payload)["entity_id"]


def test_one_invalid_task_does_not_lose_the_others(store, fake, account):
    items = [planned(i) for i in range(1, 6)] + [planned(6, task_type=987654)]
    record_planned(store, items, event_id=1)
    sender(store).drain()
    assert len(fake.tasks) == 5
    assert not tasks_for(fake, 6)
    failed = Action.get(Action.status == "rejected")
    assert json.loads(failed.payload)["entity_id"] == 6
    assert "task_type_id" in failed.last_error
    assert Action.select().where(Action.status == "done").count() == 5
    assert len(fake.requests_to("/api/v4/tasks", "POST")) == 2  # rejected whole, then the valid rest
    assert len(fake.requests_to("/api/v4/tasks", "GET")) == 1  # looked for before being sent again


def test_lost_answer_is_looked_up_not_resent(store, fake, account):
    clock = Clock()
    record_planned(store, [planned(i) for i in range(1, 4)], event_id=1)
    fake.fail("/api/v4/tasks", drop=True, after_effect=True, method="POST")
    s = sender(store, clock)
    s.flush_once()
    assert len(fake.tasks) == 3  # amoCRM created them; we never heard
    assert Action.select().where(Action.status == "done").count() == 0
    clock.advance(3600)
    s.drain()
    assert len(fake.tasks) == 3
    assert s.stats.adopted == 3 and s.stats.lookups == 1
    assert len(fake.requests_to("/api/v4/tasks", "POST")) == 1
    assert {a.result_id for a in Action.select()} == set(fake.tasks)


def test_a_failed_write_that_created_nothing_is_sent_again_after_looking(store, fake, account):
    clock = Clock()
    record_planned(store, [planned(1)], event_id=1)
    fake.fail("/api/v4/tasks", status=502, method="POST")
    s = sender(store, clock)
    s.flush_once()
    assert len(fake.tasks) == 0
    clock.advance(3600)
    s.drain()
    assert len(fake.tasks) == 1 and s.stats.lookups == 1
    assert Action.get().status == "done"


def test_gives_up_after_max_attempts(store, fake, account):
    clock = Clock()
    record_planned(store, [planned(1)], event_id=1)
    fake.fail("/api/v4/tasks", status=500, method="POST", times=None)
    s = sender(store, clock, max_attempts=3)
    for _ in range(5):
        s.flush_once()
        clock.advance(3600)
    action = Action.get()
    assert action.status == "failed" and "gave up after 3 attempts" in action.last_error


@pytest.mark.slow
def test_two_senders_never_send_the_same_action(store, fake, account):
    import threading

    from amohook.store import open_store

    record_planned(store, [planned(i) for i in range(1, 201)], event_id=1)

    def run():
        own = open_store(store.url)
        ActionSender(own, lambda sub: client_for(own, sub), batch_size=10).drain()

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    sent = [item["request_id"] for r in fake.requests_to("/api/v4/tasks", "POST") for item in r.json]
    assert len(sent) == len(set(sent)) == 200
    assert len(fake.tasks) == 200


@pytest.mark.slow
def test_crash_between_post_and_commit_creates_one_task(store, fake, account):
    record_planned(store, [planned(i) for i in range(1, 4)], event_id=1)
    # amoCRM creates the tasks, then the answer never comes: the sender is killed while waiting.
    fake.fail("/api/v4/tasks", hang=True, after_effect=True, method="POST")
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_SENDER, store.url], env=cli_env(store.url), cwd=str(ROOT))
    deadline = time.time() + 30
    while len(fake.tasks) < 3 and time.time() < deadline:
        time.sleep(0.05)
    assert len(fake.tasks) == 3
    proc.kill()
    proc.wait()
    fake.clear_faults()
    assert Action.select().where(Action.status == "sending").count() == 3
    time.sleep(2.2)  # the dead sender's lease runs out
    s = sender(store)
    s.drain()
    assert len(fake.tasks) == 3
    assert s.stats.adopted == 3
    assert Action.select().where(Action.status == "done").count() == 3


def test_a_failed_lookup_keeps_the_action_maybe_sent(store, fake, account):
    clock = Clock()
    record_planned(store, [planned(1)], event_id=1)
    fake.fail("/api/v4/tasks", drop=True, after_effect=True, method="POST")  # created, answer lost
    s = quick_sender(store, clock)
    s.flush_once()
    clock.advance(3600)
    fake.fail("/api/v4/tasks", status=429, method="GET", times=None)  # the lookup is refused
    s.flush_once()
    assert Action.get().status == "sending"
    fake.clear_faults()
    clock.advance(3600)
    s.drain()
    assert len(fake.tasks) == 1
    assert Action.get().status == "done"


def test_a_2xx_answer_that_is_not_json_counts_as_maybe_created(store, fake, account):
    clock = Clock()
    record_planned(store, [planned(2)], event_id=1)
    fake.fail(
        "/api/v4/tasks",
        status=200,
        body="<html>proxy</html>",
        content_type="text/html",
        after_effect=True,
        method="POST",
    )
    s = quick_sender(store, clock)
    s.flush_once()
    assert len(fake.tasks) == 1 and Action.get().status == "sending"
    fake.clear_faults()
    clock.advance(3600)
    s.drain()
    assert len(fake.tasks) == 1 and s.stats.adopted == 1


def test_429_on_the_post_is_not_an_attempt_and_nothing_was_created(store, fake, account):
    clock = Clock()
    record_planned(store, [planned(3)], event_id=1)
    fake.fail("/api/v4/tasks", status=429, retry_after=7, method="POST")
    s = quick_sender(store, clock)
    s.flush_once()
    action = Action.get()
    assert action.status == "pending" and action.attempts == 0
    assert action.lease_until == pytest.approx(clock.now + 7, abs=0.5)
    clock.advance(8)
    s.drain()
    assert len(fake.tasks) == 1 and s.stats.lookups == 0


def test_an_action_that_gave_up_comes_back_on_replay_and_is_looked_up_first(store, fake, account):
    clock = Clock()
    p = planned(4)
    record_planned(store, [p], event_id=1)
    fake.fail("/api/v4/tasks", status=503, method="POST", times=None)
    s = quick_sender(store, clock)
    for _ in range(30):
        if Action.get().status == "failed":
            break
        s.flush_once()
        clock.advance(4000)
    action = Action.get()
    assert action.status == "failed" and action.attempts == 10
    fake.clear_faults()
    assert record_planned(store, [p], event_id=1) == 0  # what `events replay` leads to
    s.drain()
    assert len(fake.tasks) == 1
    assert Action.get().status == "done"
    assert len(fake.requests_to("/api/v4/tasks", "GET")) >= 1  # it looked before sending


def test_an_expired_lease_is_not_used_to_post(store, fake, account):
    clock = Clock()
    record_planned(store, [planned(5)], event_id=1)
    s = quick_sender(store, clock)
    actions, _ = s.claim()
    clock.advance(s.lease_seconds + 1)  # e.g. the process stalled; another sender may own it now
    kinds()["create_task"].send(
        s, client_for(store, "example"), actions, {a.id: json.loads(a.payload) for a in actions}
    )
    assert not fake.requests_to("/api/v4/tasks", "POST")


def test_notes_and_tasks_go_in_batches_of_their_own_kind(store, fake, account):
    record_planned(store, [planned(1), planned_note(1), planned(2), planned_note(2)], event_id=1)
    sender(store).drain()
    assert len(fake.tasks) == 2 and len(fake.notes) == 2
    assert [len(r.json) for r in fake.requests_to("/api/v4/tasks", "POST")] == [2]
    assert [len(r.json) for r in fake.requests_to("/api/v4/leads/notes", "POST")] == [2]
    assert {n["params"]["text"] for n in fake.notes.values()} == {"Moved to Qualified"}
    assert Action.select().where(Action.status == "done").count() == 4


def test_a_note_whose_answer_was_lost_is_adopted_not_added_twice(store, fake, account):
    clock = Clock()
    # The same text on the lead from an earlier change must not be mistaken for this one.
    fake.notes[1] = {
        "id": 1,
        "entity_id": 9,
        "note_type": "common",
        "params": {"text": "Moved to Qualified"},
        "created_at": int(time.time()) - 86400,
    }
    record_planned(store, [planned_note(9)], event_id=1)
    fake.fail("/api/v4/leads/notes", drop=True, after_effect=True, method="POST")
    s = sender(store, clock)
    s.flush_once()
    assert len(fake.notes) == 2
    clock.advance(3600)
    s.drain()
    assert len(fake.notes) == 2 and s.stats.adopted == 1
    assert Action.get().result_id != 1


# -- found by review: lookups must not take another change's task or note -------------------
def change_note(lead_id: int, change: str, text: str = "Website deal moved to Negotiation") -> PlannedAction:
    key = hashlib.sha256(f"note|{lead_id}|{change}".encode()).hexdigest()
    payload = {"entity_id": lead_id, "note_type": "common", "params": {"text": text}, "request_id": key[:32]}
    return PlannedAction(key=key, rule="r", account="example", lead_id=lead_id, payload=payload, kind="add_note")


def change_task(lead_id: int, change: str, complete_till: int = 1_900_000_000) -> PlannedAction:
    # due = "end_of_day" (or "10:00"): two changes of one lead on one day share complete_till
    key = hashlib.sha256(f"task|{lead_id}|{change}".encode()).hexdigest()
    payload = {
        "text": "Call Acme about the offer",
        "complete_till": complete_till,
        "entity_id": lead_id,
        "entity_type": "leads",
        "task_type_id": TASK_TYPE,
        "responsible_user_id": RESPONSIBLE,
        "request_id": key[:32],
    }
    return PlannedAction(key=key, rule="r", account="example", lead_id=lead_id, payload=payload, kind="create_task")


def test_a_note_of_a_later_change_is_not_adopted_by_an_earlier_action(store, fake, account):
    """A1's POST got a 502 (nothing created); the lead bounces out and back, A2 is created; A1's
    lookup must not take A2's note as its own: each change should end with its own note."""
    clock = Clock()
    record_planned(store, [change_note(9, "change-1")], event_id=1)
    fake.fail("/api/v4/leads/notes", status=502, method="POST")
    s = quick_sender(store, clock)
    s.flush_once()
    assert len(fake.notes) == 0 and Action.get().status == "sending"
    record_planned(store, [change_note(9, "change-2")], event_id=2)
    s.flush_once()  # A1 is still backing off; A2 goes alone
    assert len(fake.notes) == 1
    clock.advance(3600)
    s.drain()
    results = [a.result_id for a in Action.select().order_by(Action.id)]
    assert all(a.status == "done" for a in Action.select())
    assert len(set(results)) == 2, f"both actions claim note {results}: one note lost for good"
    assert len(fake.notes) == 2


def test_a_note_made_within_the_minute_before_is_not_adopted(store, fake, account):
    """A1 done with N1; the lead bounces back within a minute (A2, same text); A2's POST gets a 502:
    the 60-second skew window lets A2 adopt N1."""
    clock = Clock()
    record_planned(store, [change_note(9, "change-1")], event_id=1)
    s = quick_sender(store, clock)
    s.drain()
    assert len(fake.notes) == 1
    time.sleep(1.1)
    record_planned(store, [change_note(9, "change-2")], event_id=2)
    fake.fail("/api/v4/leads/notes", status=502, method="POST")
    s.flush_once()
    clock.advance(3600)
    s.drain()
    results = [a.result_id for a in Action.select().order_by(Action.id)]
    assert len(set(results)) == 2, f"both actions claim note {results}: the second change has no note"


def test_a_task_of_another_change_with_the_same_due_time_is_not_adopted(store, fake, account):
    clock = Clock()
    record_planned(store, [change_task(7, "change-1")], event_id=1)
    fake.fail("/api/v4/tasks", status=502, method="POST")
    s = quick_sender(store, clock)
    s.flush_once()
    record_planned(store, [change_task(7, "change-2")], event_id=2)
    s.flush_once()
    assert len(fake.tasks) == 1
    clock.advance(3600)
    s.drain()
    results = [a.result_id for a in Action.select().order_by(Action.id)]
    assert len(set(results)) == 2, f"both actions claim task {results}: one task lost for good"


def test_a_post_refused_with_401_is_not_repeated_inside_the_lease(store, fake, account):
    """The refresh may wait minutes for its own lease; the POST goes back to the queue instead."""
    clock = Clock()
    record_planned(store, [planned(11)], event_id=1)
    fake.expire_access_tokens()
    s = quick_sender(store, clock)
    s.flush_once()
    action = Action.get()
    assert fake.refresh_calls == 1 and not fake.tasks
    assert [r.status for r in fake.requests_to("/api/v4/tasks", "POST")] == [401]
    assert action.status == "pending" and action.attempts == 1
    s.drain()
    assert len(fake.tasks) == 1 and Action.get().status == "done"
