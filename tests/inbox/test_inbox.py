"""The inbox on every backend: storing deliveries, group commit, claiming with leases, replay, stats,
and the `events` commands."""

from __future__ import annotations

import json
import threading
import time

import peewee
import pytest

from amohook import inbox
from amohook.inbox import GroupCommitter, Incoming, StoreUnavailable
from amohook.store.models import Attempt, Delivery, Event
from amohook.webhooks.parse import BodyRejected, parse_webhook
from tests.conftest import run_cli
from tests.helpers.deliveries import FORM, NOW, claim, fixture_body, incoming, lead_body


def unforeseen(lead_id: int) -> Incoming:
    """A delivery no backend can store that skipped the listener's checks: a lone surrogate in its
    event data (``check_storable`` refuses it at the door), so it fails after its delivery row."""
    return incoming(b'{"leads": {"add": [{"id": "%d", "name": "\\ud800"}]}}' % lead_id, "application/json")


def queue(store, count: int, *, received_at: float = NOW) -> list[int]:
    inbox.store_deliveries(store, [incoming(lead_body(1000 + i), received_at=received_at) for i in range(count)])
    return [e.id for e in Event.select(Event.id).order_by(Event.id)]


# -- storing -----------------------------------------------------------------------------------
def test_a_delivery_and_its_events_are_stored_together(store):
    body = fixture_body("01_lead_status_2016.txt")
    item = incoming(body, headers={"user-agent": "amoCRM-WebHook-client/1.0"}, remote_addr="10.0.0.7", received_at=NOW)
    (stored,) = inbox.store_deliveries(store, [item])
    assert stored.new and stored.events == 1
    delivery = Delivery.get_by_id(stored.delivery_id)
    assert delivery.body.encode() == body and delivery.times_received == 1
    assert json.loads(delivery.headers) == {"user-agent": "amoCRM-WebHook-client/1.0"}
    assert delivery.remote_addr == "10.0.0.7" and delivery.received_at == NOW
    (event,) = Event.select()
    assert (event.entity, event.action, event.entity_id, event.account) == ("leads", "status", "31926520", "test000002")
    assert event.status == "pending" and event.next_attempt_at == NOW and event.attempts == 0
    assert json.loads(event.data)["old_status_id"] == "10216995"


def test_the_same_body_again_adds_no_events_and_counts_the_resend(store):
    body = lead_body(7, items=2)
    first = inbox.store_deliveries(store, [incoming(body)])
    again = inbox.store_deliveries(store, [incoming(body), incoming(body)])
    assert [s.new for s in first + again] == [True, False, False]
    assert {s.delivery_id for s in first + again} == {first[0].delivery_id}
    assert Event.select().count() == 2
    assert Delivery.get().times_received == 3


def test_a_body_twice_in_one_batch_is_stored_once(store):
    body = lead_body(7)
    results = inbox.store_deliveries(store, [incoming(body), incoming(body)])
    assert [r.new for r in results] == [True, False]
    assert Event.select().count() == 1 and Delivery.get().times_received == 2


def test_a_body_without_entity_items_is_stored_with_no_events(store):
    (stored,) = inbox.store_deliveries(store, [incoming(b"account%5Bsubdomain%5D=example&account%5Bid%5D=42")])
    assert stored.new and stored.events == 0
    assert Delivery.select().count() == 1 and Event.select().count() == 0


def test_a_failing_batch_stores_nothing_at_all(store):
    good = incoming(lead_body(1))
    bad = unforeseen(2)  # fails while the batch is half written
    with pytest.raises(UnicodeEncodeError):
        inbox.store_deliveries(store, [good, bad])
    assert Delivery.select().count() == 0 and Event.select().count() == 0


def test_thousands_of_events_in_one_body_are_inserted_in_chunks(store):
    (stored,) = inbox.store_deliveries(store, [incoming(lead_body(1, items=3000))])
    assert stored.events == 3000 and Event.select().count() == 3000
    assert [e.idx for e in Event.select(Event.idx).order_by(Event.idx).limit(3)] == [0, 1, 2]


@pytest.mark.parametrize(
    "body, reason",
    [
        (("e" * 65 + "%5Badd%5D%5B0%5D%5Bid%5D=1").encode(), "entity longer than 64"),
        (b"leads%5B" + b"a" * 65 + b"%5D%5B0%5D%5Bid%5D=1", "action longer than 64"),
        (b"leads%5Badd%5D%5B0%5D%5Bid%5D=" + b"9" * 65, "entity_id longer than 64"),
        (b"leads%5Badd%5D%5B0%5D%5Bid%5D=1&account%5Bsubdomain%5D=" + b"s" * 191, "account longer than 190"),
    ],
)
def test_what_no_backend_could_store_is_refused_as_a_bad_request(body, reason):
    with pytest.raises(BodyRejected, match=reason):
        inbox.check_storable(body, parse_webhook(body, FORM))


def test_a_lone_surrogate_from_a_json_escape_is_refused_but_a_pair_is_fine():
    lone = b'{"leads": {"add": [{"id": "1", "name": "\\ud800"}]}}'
    with pytest.raises(BodyRejected, match="surrogate"):
        inbox.check_storable(lone, parse_webhook(lone, "application/json"))
    pair = b'{"leads": {"add": [{"id": "1", "name": "\\ud83d\\ude00"}]}}'
    inbox.check_storable(pair, parse_webhook(pair, "application/json"))


def test_control_characters_in_header_borne_columns_are_dropped(store):
    body = lead_body(1)
    item = Incoming(
        body=body, parsed=parse_webhook(body, FORM), content_type="application/x-www-form-urlencoded\x00\x01"
    )
    inbox.store_deliveries(store, [item])
    assert Delivery.get().content_type == "application/x-www-form-urlencoded"


def test_only_the_useful_headers_are_kept():
    kept = inbox.useful_headers(
        [("User-Agent", "amoCRM-Webhooks/3.0"), ("X-Amocrm-Requestid", "abc"), ("Cookie", "secret"), ("Accept", "*/*")]
    )
    assert kept == {"user-agent": "amoCRM-Webhooks/3.0", "x-amocrm-requestid": "abc"}


# -- group commit ------------------------------------------------------------------------------
class GatedCommitter(GroupCommitter):
    """A committer whose first commit waits for the test to open the gate."""

    def __init__(self, store, **kw):
        super().__init__(store, **kw)
        self.gate = threading.Event()
        self.took_first = threading.Event()

    def _commit(self, batch):
        self.took_first.set()
        self.gate.wait(10)
        super()._commit(batch)


def test_requests_that_arrive_during_a_commit_share_the_next_transaction(store):
    committer = GatedCommitter(store).start()
    results: dict[int, object] = {}

    def send(i):
        results[i] = committer.submit(incoming(lead_body(100 + i)), timeout=10)

    first = threading.Thread(target=send, args=(0,))
    first.start()
    assert committer.took_first.wait(5)
    others = [threading.Thread(target=send, args=(i,)) for i in range(1, 40)]
    for t in others:
        t.start()
    deadline = time.monotonic() + 5
    while committer.queued() < 39 and time.monotonic() < deadline:
        time.sleep(0.01)
    committer.gate.set()
    for t in [first, *others]:
        t.join(10)
    committer.stop()
    assert len(results) == 40 and all(r.new for r in results.values())
    assert committer.batches == 2 and committer.largest_batch == 39
    assert Event.select().count() == 40


def test_a_request_that_gives_up_before_its_batch_is_taken_is_never_stored(store):
    committer = GatedCommitter(store).start()
    in_flight = incoming(lead_body(1))
    waiting = incoming(lead_body(2))
    outcome = {}

    def send(name, item):
        try:
            committer.submit(item, timeout=0.3)
            outcome[name] = "stored"
        except StoreUnavailable as exc:
            outcome[name] = exc.committed

    t1 = threading.Thread(target=send, args=("in_flight", in_flight))
    t1.start()
    assert committer.took_first.wait(5)
    t2 = threading.Thread(target=send, args=("waiting", waiting))
    t2.start()
    t1.join(5)
    t2.join(5)
    # Both answered 503; the one already being committed may land, the withdrawn one may not.
    assert outcome == {"in_flight": None, "waiting": False}
    committer.gate.set()
    committer.stop()
    shas = {d.body_sha256 for d in Delivery.select()}
    assert in_flight.sha256 in shas and waiting.sha256 not in shas
    # amoCRM resends both: the landed one is recognised, the withdrawn one is stored now.
    again = inbox.store_deliveries(store, [incoming(in_flight.body), incoming(waiting.body)])
    assert [s.new for s in again] == [False, True]
    assert Event.select().count() == 2


def test_a_store_failure_is_reported_to_every_waiter_and_retried_first(store, monkeypatch):
    calls = []

    def broken(store_, items):
        calls.append(len(items))
        raise peewee.OperationalError("disk I/O error")

    monkeypatch.setattr(inbox.receive, "store_deliveries", broken)  # what the writer calls
    committer = GroupCommitter(store, retries=2).start()
    with pytest.raises(StoreUnavailable, match="disk I/O error") as info:
        committer.submit(incoming(lead_body(1)), timeout=5)
    committer.stop()
    assert info.value.committed is False
    assert calls == [1, 1, 1]


def test_one_delivery_that_cannot_be_stored_does_not_fail_the_others_in_its_batch(store):
    committer = GatedCommitter(store).start()
    outcome = {}
    poisoned = unforeseen(3)

    def send(name, item):
        try:
            committer.submit(item, timeout=10)
            outcome[name] = "stored"
        except StoreUnavailable:
            outcome[name] = "503"

    first = threading.Thread(target=send, args=("first", incoming(lead_body(1))))
    first.start()
    assert committer.took_first.wait(5)
    rest = [
        threading.Thread(target=send, args=(name, item))
        for name, item in (("good", incoming(lead_body(2))), ("poisoned", poisoned))
    ]
    for t in rest:
        t.start()
    while committer.queued() < 2:
        time.sleep(0.01)
    committer.gate.set()
    for t in [first, *rest]:
        t.join(10)
    committer.stop()
    assert outcome == {"first": "stored", "good": "stored", "poisoned": "503"}
    assert sorted(e.entity_id for e in Event.select()) == ["1", "2"]


def test_after_stop_nothing_is_accepted(store):
    committer = GroupCommitter(store).start()
    committer.submit(incoming(lead_body(1)), timeout=5)
    committer.stop()
    with pytest.raises(StoreUnavailable, match="shutting down"):
        committer.submit(incoming(lead_body(2)), timeout=5)


# -- claiming ----------------------------------------------------------------------------------


def test_claimed_events_are_leased_to_one_worker_only(store):
    queue(store, 3)
    first = claim(store, "a", limit=2)
    second = claim(store, "b")
    assert [e.id for e in first] == [1, 2] and [e.id for e in second] == [3]
    assert claim(store, "c") == []
    row = Event.get_by_id(1)
    assert (row.status, row.lease_owner, row.lease_until) == ("running", "a", NOW + 60.0)
    assert first[0].data["id"] == "1000" and first[0].account == "example" and first[0].attempts == 0


def test_events_not_yet_due_are_not_claimed(store):
    queue(store, 1)
    Event.update(next_attempt_at=NOW + 30).execute()
    assert claim(store, "a") == []
    assert [e.id for e in claim(store, "a", now=NOW + 30)] == [1]


def test_an_expired_lease_is_claimed_again_and_counts_as_an_attempt(store):
    queue(store, 1)
    claim(store, "crashed", lease=10)
    assert claim(store, "b", now=NOW + 5) == []
    (again,) = claim(store, "b", now=NOW + 11)
    assert again.attempts == 1
    assert Event.get_by_id(1).lease_owner == "b"
    (attempt,) = Attempt.select()
    assert (attempt.worker, attempt.outcome, attempt.finished_at) == ("crashed", "expired", NOW + 11)


def test_an_event_whose_last_attempt_expired_is_dead_not_claimed(store):
    queue(store, 1)
    Event.update(attempts=4).execute()
    claim(store, "crashed", lease=10, max_attempts=5)
    assert claim(store, "b", now=NOW + 11, max_attempts=5) == []
    row = Event.get_by_id(1)
    assert row.status == "dead" and row.attempts == 5 and row.lease_owner is None


def test_complete_needs_the_lease_to_still_be_ours(store):
    queue(store, 2)
    claim(store, "a", lease=10)
    assert inbox.complete(store, 1, "a", started_at=NOW, now=NOW + 1)
    claim(store, "b", now=NOW + 11)  # a stalled; b takes event 2 over
    assert not inbox.complete(store, 2, "a", started_at=NOW, now=NOW + 12)
    assert [(e.status, e.lease_owner) for e in Event.select().order_by(Event.id)] == [("done", None), ("running", "b")]
    assert [a.outcome for a in Attempt.select().where(Attempt.worker == "a").order_by(Attempt.id)] == [
        "ok",
        "expired",
        "lost",
    ]


def test_fail_schedules_a_retry_or_marks_dead(store):
    queue(store, 2)
    claim(store, "a")
    assert inbox.fail(store, 1, "a", error="boom", retry_at=NOW + 40, started_at=NOW, now=NOW + 1)
    assert inbox.fail(store, 2, "a", error="x" * 5000, retry_at=None, started_at=NOW, now=NOW + 1)
    one, two = Event.select().order_by(Event.id)
    assert (one.status, one.next_attempt_at, one.attempts, one.last_error, one.lease_owner) == (
        "pending",
        NOW + 40,
        1,
        "boom",
        None,
    )
    assert two.status == "dead" and len(two.last_error) == inbox.receive.ERROR_MAX
    assert [a.outcome for a in Attempt.select().order_by(Attempt.id)] == ["retry", "dead"]


def test_release_returns_unstarted_events_without_an_attempt(store):
    queue(store, 3)
    claim(store, "a")
    assert inbox.release(store, [2, 3], "a", now=NOW + 1) == 2
    assert inbox.release(store, [1], "someone-else", now=NOW + 1) == 0
    rows = list(Event.select().order_by(Event.id))
    assert [r.status for r in rows] == ["running", "pending", "pending"]
    assert rows[1].lease_owner is None and rows[1].attempts == 0 and Attempt.select().count() == 0


def test_renew_extends_only_our_leases(store):
    queue(store, 2)
    claim(store, "a", limit=1, lease=10)
    claim(store, "b", limit=1, lease=10)
    assert inbox.renew(store, [1, 2], "a", lease_seconds=10, now=NOW + 8) == 1
    assert [e.lease_until for e in Event.select().order_by(Event.id)] == [NOW + 18, NOW + 10]


# -- replay and stats --------------------------------------------------------------------------
def test_replay_queues_again_and_says_why_not(store):
    queue(store, 4)
    claim(store, "a", limit=3)
    inbox.complete(store, 1, "a", started_at=NOW, now=NOW)
    inbox.fail(store, 2, "a", error="boom", retry_at=None, started_at=NOW, now=NOW)
    refused = inbox.replay(store, [1, 2, 3, 99], now=NOW + 5)
    assert (refused.queued, refused.skipped, refused.missing) == ([], {}, [99])  # an unknown id queues nothing
    assert Event.get_by_id(2).status == "dead"
    result = inbox.replay(store, [1, 2, 3], now=NOW + 5)
    assert result.queued == [1, 2]
    assert set(result.skipped) == {3} and "running" in result.skipped[3] and result.missing == []
    for row in Event.select().where(Event.id.in_([1, 2])):
        assert (row.status, row.attempts, row.next_attempt_at) == ("pending", 0, NOW + 5)


def test_replay_dead_takes_every_dead_event(store):
    queue(store, 3)
    Event.update(status="dead").where(Event.id != 2).execute()
    assert inbox.replay(store, dead=True, now=NOW).queued == [1, 3]
    assert inbox.replay(store, dead=True, now=NOW).queued == []


def test_queue_stats_count_by_status_and_age_the_oldest_pending(store):
    queue(store, 2, received_at=NOW - 100)
    queue(store, 0)
    inbox.store_deliveries(store, [incoming(lead_body(5000), received_at=NOW - 10)])
    claim(store, "a", limit=1)
    Event.update(next_attempt_at=NOW + 60).where(Event.id == 3).execute()
    stats = inbox.queue_stats(store, now=NOW)
    assert (stats.pending, stats.due, stats.running, stats.dead) == (2, 1, 1, 0)
    assert stats.oldest_pending_age == 100


def test_queue_stats_of_an_empty_queue(store):
    assert inbox.queue_stats(store, now=NOW) == inbox.QueueStats(0, 0, 0, 0, None)


# -- the events commands -----------------------------------------------------------------------


def test_events_list_json_has_the_documented_fields(filled):
    result = run_cli(["events", "list", "--json"], filled)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["id"] for r in rows] == [2, 1]
    assert {"id", "entity", "action", "entity_id", "account", "status", "received_at"} <= set(rows[0])
    assert (rows[1]["entity"], rows[1]["action"], rows[1]["entity_id"], rows[1]["status"]) == (
        "leads",
        "status",
        "31926520",
        "dead",
    )
    assert rows[1]["received_at"].endswith("Z")


def test_events_list_filters_by_status_and_entity(filled):
    dead = json.loads(run_cli(["events", "list", "--json", "--status", "dead"], filled).stdout)
    contacts = json.loads(run_cli(["events", "list", "--json", "--entity", "contacts", "--limit", "1"], filled).stdout)
    assert [r["id"] for r in dead] == [1] and [r["entity"] for r in contacts] == ["contacts"]
    bad = run_cli(["events", "list", "--status", "nope"], filled)
    assert bad.returncode == 2 and "'pending', 'running', 'done', 'dead'" in bad.stderr


def test_events_show_gives_body_data_and_attempts(filled):
    result = run_cli(["events", "show", "1", "--json"], filled)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["delivery"]["body"].encode() == fixture_body("01_lead_status_2016.txt")
    assert shown["delivery"]["headers"] == {"user-agent": "amoCRM-WebHook-client/1.0"}
    assert shown["data"]["id"] == "31926520" and shown["attempt_count"] == 1
    assert [(a["outcome"], a["error"]) for a in shown["attempts"]] == [("dead", "handler: boom")]
    human = run_cli(["events", "show", "1"], filled)
    assert "last error: handler: boom" in human.stdout and "body:" in human.stdout
    missing = run_cli(["events", "show", "99"], filled)
    assert missing.returncode == 2 and "no event 99" in missing.stderr


def test_events_replay_by_id_and_dead(filled):
    result = run_cli(["events", "replay", "--dead", "--json"], filled)
    assert json.loads(result.stdout) == {"queued": [1], "skipped": {}}
    result = run_cli(["events", "replay", "2", "77"], filled)
    assert result.returncode == 2 and "no event 77" in result.stderr and "nothing was queued" in result.stderr
    assert run_cli(["events", "replay"], filled).returncode == 2
