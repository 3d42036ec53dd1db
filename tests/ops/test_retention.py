"""Retention: old finished work goes, pending and dead work stays, effects stay exactly once."""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import urlencode

import pytest
import requests

from amohook.inbox import Incoming, store_deliveries
from amohook.ops.retention import DEAD_KEEP, EXACTLY_ONCE, prune
from amohook.store.models import Action, Attempt, ChangeSeen, Delivery, Event
from amohook.webhooks.parse import parse_webhook
from tests.conftest import run_cli

FORM = "application/x-www-form-urlencoded"
DAY = 86400


def body(lead: int, stamp: int = 1_750_000_000) -> bytes:
    return urlencode(
        {
            "account[subdomain]": "example",
            "leads[status][0][id]": str(lead),
            "leads[status][0][status_id]": "2",
            "leads[status][0][old_status_id]": "1",
            "leads[status][0][pipeline_id]": "9",
            "leads[status][0][last_modified]": str(stamp),
        }
    ).encode()


def stored(store, n: int, *, start: int = 1, status: str = "done", age: float = 0.0) -> list[int]:
    """n deliveries with one event each, finished ``age`` seconds ago, each with one attempt."""
    items = [
        Incoming(body=body(start + i), parsed=parse_webhook(body(start + i), FORM), content_type=FORM) for i in range(n)
    ]
    store_deliveries(store, items)
    ids = [e.id for e in Event.select(Event.id).where(Event.entity_id.in_([str(start + i) for i in range(n)]))]
    then = time.time() - age
    with store.write():
        Event.update(status=status, updated_at=then).where(Event.id.in_(ids)).execute()
        for event_id in ids:
            Attempt.create(event_id=event_id, worker="t", started_at=then, finished_at=then, outcome="ok")
    return ids


def test_old_done_events_go_with_their_deliveries_and_attempts(store):
    old = stored(store, 30, start=1, age=40 * DAY)
    young = stored(store, 5, start=100, age=2 * DAY)
    pending = stored(store, 3, start=200, status="pending", age=40 * DAY)
    dead = stored(store, 2, start=300, status="dead", age=40 * DAY)
    very_dead = stored(store, 2, start=400, status="dead", age=DEAD_KEEP + DAY)
    counted = prune(store, keep=30 * DAY, dry_run=True)
    result = prune(store, keep=30 * DAY, batch=7)
    assert (result.events, result.dead_events, result.deliveries, result.attempts) == (30, 2, 32, 32)
    assert (counted.events, counted.dead_events, counted.deliveries, counted.attempts) == (30, 2, 32, 32)
    left = {e.id for e in Event.select()}
    assert left == set(young + pending + dead)
    assert not left & set(old + very_dead)
    assert Delivery.select().count() == len(left)
    assert Attempt.select().count() == len(left)
    assert prune(store, keep=30 * DAY).events == 0  # nothing more to do


def test_action_keys_outlive_their_events_for_the_exactly_once_window(store):
    ids = stored(store, 2, age=3 * DAY)
    now = time.time()
    with store.write():
        for i, event_id in enumerate(ids):
            Action.create(
                key=f"k{i}",
                account="example",
                rule="r",
                event_id=event_id,
                kind="create_task",
                status="done",
                created_at=now - 3 * DAY,
                updated_at=now - 3 * DAY,
            )
        ChangeSeen.create(
            account="example",
            lead_id=1,
            kind="stage_changed",
            target="9:2",
            key_at=1,
            hook_at=1,
            first_source="webhook",
            created_at=now - 3 * DAY,
        )
    result = prune(store, keep=DAY)
    assert result.events == 2
    assert Action.select().count() == 2 and ChangeSeen.select().count() == 1  # a duplicate may still come
    later = prune(store, keep=DAY, clock=lambda: now + EXACTLY_ONCE)
    assert (later.actions, later.changes) == (2, 1)


def test_a_failed_action_waits_for_its_dead_event(store):
    [event_id] = stored(store, 1, status="dead", age=40 * DAY)
    old = time.time() - 40 * DAY
    with store.write():
        Action.create(
            key="f",
            account="example",
            rule="r",
            event_id=event_id,
            kind="create_task",
            status="failed",
            created_at=old,
            updated_at=old,
        )
    assert prune(store, keep=30 * DAY).actions == 0
    assert Action.select().count() == 1


def test_prune_by_hand(store):
    stored(store, 4, age=40 * DAY)
    dry = run_cli(["prune", "--dry-run", "--json"], store.url)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["events"] == 4 and Event.select().count() == 4
    done = run_cli(["prune"], store.url)
    assert done.returncode == 0 and "deleted: 4 done event(s)" in done.stdout
    assert Event.select().count() == 0
    short = run_cli(["prune", "--older-than", "1h"], store.url)
    assert short.returncode == 2 and "is too short" in short.stderr and "give 1d to 366d" in short.stderr
    bad = run_cli(["prune", "--older-than", "soon"], store.url)
    assert bad.returncode == 2 and "not a duration" in bad.stderr


@pytest.mark.slow
def test_pruning_while_the_listener_takes_webhooks_loses_nothing(store, tmp_path):
    from tests.helpers.e2e import SECRET, Serve

    stored(store, 3000, start=10_000, age=40 * DAY)
    serve = Serve(store.url, "--workers", "0", "--keep", "off")
    posted: list[int] = []
    errors: list[str] = []

    def send() -> None:
        for i in range(300):
            lead = 900_000 + i
            r = requests.post(
                f"{serve.url}/webhook/{SECRET}", data=body(lead), headers={"Content-Type": FORM}, timeout=5
            )
            if r.status_code == 200:
                posted.append(lead)
            else:
                errors.append(str(r.status_code))

    try:
        sender = threading.Thread(target=send)
        sender.start()
        result = prune(store, keep=30 * DAY, batch=200)
        sender.join(60)
    finally:
        serve.stop()
    assert result.events == 3000
    assert not errors
    kept = {int(e.entity_id) for e in Event.select(Event.entity_id).where(Event.status == "pending")}
    assert set(posted) <= kept and len(posted) == 300


def test_the_background_pruner_prunes_and_stops(store):
    from amohook.ops.retention import pruner

    stored(store, 5, age=40 * DAY)
    stop = threading.Event()
    thread = threading.Thread(target=pruner(store, 30 * DAY, every=0.1, first_after=0.1).run, args=(stop,))
    thread.start()
    deadline = time.time() + 10
    while time.time() < deadline and Event.select().count():
        time.sleep(0.05)
    stop.set()
    thread.join(5)
    assert Event.select().count() == 0 and not thread.is_alive()


def test_serve_refuses_a_keep_below_a_day(store):
    result = run_cli(["worker", "--handler", "json:dumps", "--keep", "2h", "--once"], store.url)
    assert result.returncode == 2 and "is too short" in result.stderr and "give 1d to 366d" in result.stderr


def test_keys_and_change_records_stay_while_an_older_event_could_be_replayed(store):
    """A stored event (here pending, 20 days old) may be replayed: the change it reports, and that
    change's keys, must still be found, even past the 8 days (review finding)."""
    now = time.time()
    item = Incoming(
        body=body(777), parsed=parse_webhook(body(777), FORM), content_type=FORM, received_at=now - 20 * DAY
    )
    store_deliveries(store, [item])
    with store.write():
        Action.create(
            key="k",
            account="example",
            rule="r",
            event_id=None,
            kind="create_task",
            status="done",
            created_at=now - 15 * DAY,
            updated_at=now - 15 * DAY,
        )
        ChangeSeen.create(
            account="example",
            lead_id=777,
            kind="stage_changed",
            target="9:2",
            key_at=1,
            hook_at=1,
            first_source="webhook",
            created_at=now - 15 * DAY,
        )
    kept = prune(store, keep=DAY)
    assert (kept.actions, kept.changes) == (0, 0)
    assert prune(store, keep=DAY, dry_run=True).actions == 0
    with store.write():
        Event.update(status="done", updated_at=now - 20 * DAY).execute()
    gone = prune(store, keep=DAY)
    assert (gone.events, gone.actions, gone.changes) == (1, 1, 1)


def test_a_finished_action_whose_event_lives_on_does_not_stall_the_rest(store):
    now = time.time()
    with store.write():
        for i in range(5):
            Action.create(
                key=f"old{i}",
                account="example",
                rule="r",
                event_id=None,
                kind="create_task",
                status="done",
                created_at=now - 40 * DAY,
                updated_at=now - 40 * DAY,
            )
    assert prune(store, keep=30 * DAY, batch=2).actions == 5


def test_prune_leaves_events_a_replay_queued_between_its_read_and_its_delete(store):
    """The interleaving forced: prune reads a batch of old done events, a replay queues them
    again and commits, then prune deletes. They (and their attempts and deliveries) must stay."""
    from amohook.inbox import replay

    ids = stored(store, 3, age=40 * DAY)
    other = stored(store, 2, start=50, age=40 * DAY)
    replayed: list[int] = []

    def replay_now(batch: list[int]) -> None:
        if replayed:
            return
        if store.is_sqlite:  # one writer at a time: the same connection stands in for the other process
            replayed.extend(replay(store, ids, now=time.time()).queued)
            return
        thread = threading.Thread(target=lambda: replayed.extend(replay(store, ids, now=time.time()).queued))
        thread.start()
        thread.join(30)
        store_thread_done = not thread.is_alive()
        assert store_thread_done, "the replay waited for the pruner: no interleaving"

    result = prune(store, keep=30 * DAY, before_delete=replay_now)
    assert sorted(replayed) == sorted(ids)
    assert result.events == 2
    left = {e.id: e.status for e in Event.select()}
    assert left == {i: "pending" for i in ids}
    assert not set(other) & set(left)
    assert {a.event_id for a in Attempt.select()} == set(ids)
    assert Delivery.select().count() == 3


def test_an_event_with_a_failed_action_stays_so_doctors_replay_works(store):
    """A done event whose action gave up is kept past --keep: doctor's `events replay N` must find it."""
    [event_id] = stored(store, 1, age=40 * DAY)
    [gone] = stored(store, 1, start=60, age=40 * DAY)
    old = time.time() - 35 * DAY
    with store.write():
        Action.create(
            key="f",
            account="example",
            rule="r",
            event_id=event_id,
            kind="create_task",
            status="failed",
            last_error="amoCRM answered 502",
            created_at=old,
            updated_at=old,
        )
    assert prune(store, keep=30 * DAY, dry_run=True).events == 1
    assert prune(store, keep=30 * DAY).events == 1
    assert {e.id for e in Event.select()} == {event_id} and gone != event_id
    doctor = run_cli(["doctor"], store.url)
    assert f"amohook events replay {event_id}" in doctor.stdout, doctor.stdout
    replayed = run_cli(["events", "replay", str(event_id)], store.url)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert Event.get_by_id(event_id).status == "pending"
    # Once the failed action has had its 90 days, both go.
    with store.write():
        Event.update(status="done", updated_at=old).execute()
        Action.update(updated_at=time.time() - DEAD_KEEP - DAY).execute()
    later = prune(store, keep=30 * DAY, clock=lambda: time.time() + EXACTLY_ONCE)
    assert later.actions == 1
    assert later.events + prune(store, keep=30 * DAY).events == 1  # the event at the next run at the latest


def test_prune_by_hand_waits_its_turn_and_names_the_holder(store):
    from amohook.ops.retention import LEASE
    from amohook.store import lease as leases

    stored(store, 2, age=40 * DAY)
    owner = "otherhost:4242:1:abcd1234"
    assert leases.try_acquire(LEASE, owner, 600)
    busy = run_cli(["prune"], store.url)
    assert busy.returncode == 4, busy.stdout + busy.stderr
    assert "otherhost:4242" in busy.stderr and "runs out at" in busy.stderr and "UTC" in busy.stderr
    assert Event.select().count() == 2
    dry = run_cli(["prune", "--dry-run", "--json"], store.url)  # counting takes no lease
    assert dry.returncode == 0 and json.loads(dry.stdout)["events"] == 2
    leases.release(LEASE, owner)
    done = run_cli(["prune"], store.url)
    assert done.returncode == 0 and Event.select().count() == 0
    assert leases.holder_info(LEASE) is None  # released after the run


def test_doctor_names_only_events_that_can_be_replayed(store):
    """A failed action whose event an older amohook pruned: doctor's command must still work."""
    [kept] = stored(store, 1, age=DAY)
    with store.write():
        for key, event_id in (("a", kept), ("b", 999_999)):
            Action.create(key=key, account="example", rule="r", event_id=event_id, kind="create_task", status="failed")
    doctor = run_cli(["doctor"], store.url)
    assert f"amohook events replay {kept}`" in doctor.stdout, doctor.stdout
    assert "999999" not in doctor.stdout and "1 of their events were pruned already" in doctor.stdout
    assert run_cli(["events", "replay", str(kept)], store.url).returncode == 0


def test_doctor_warns_rather_than_fails_for_failed_actions_nothing_can_retry(store):
    with store.write():
        Action.create(key="x", account="example", rule="r", event_id=424242, kind="create_task", status="failed")
    doctor = run_cli(["doctor"], store.url)
    line = next(line for line in doctor.stdout.splitlines() if "failed actions" in line)
    assert line.startswith("!"), doctor.stdout
    assert "replay 424242" not in doctor.stdout and "cannot be retried" in doctor.stdout


def test_doctors_replay_command_for_many_events_runs_as_shown(store):
    ids = stored(store, 12, age=DAY)
    with store.write():
        for event_id in ids:
            Action.create(
                key=f"m{event_id}", account="example", rule="r", event_id=event_id, kind="create_task", status="failed"
            )
    doctor = run_cli(["doctor"], store.url)
    command = doctor.stdout.split("`amohook events replay ", 1)[1].split("`", 1)[0]
    assert "…" not in command and "(the first 10 of 12)" in doctor.stdout
    assert run_cli(["events", "replay", *command.split()], store.url).returncode == 0
