"""The lead-changing actions (move_lead, set_field) and notify, exactly once, on every backend.

The same trials as tasks (tests/actions/test_actions.py): duplicates, a lost answer, a crash between
sending and recording, a batch with one bad item — against the fake amoCRM's PATCH /api/v4/leads
and a real local HTTP receiver for notify.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from amohook.actions import record_planned
from amohook.actions.base import PlannedAction
from amohook.actions.notify import idempotency_key
from amohook.store.models import Action
from tests.conftest import ROOT, cli_env, run_cli
from tests.helpers.actions import (
    CRASHING_SENDER,
    Clock,
    Receiver,
    make_sales,
    move,
    notify,
    sender,
    set_field,
)


@pytest.fixture
def sales(fake, account):
    return make_sales(fake)


def patches(fake) -> int:
    return len(fake.requests_to("/api/v4/leads", "PATCH"))


def test_moves_go_in_one_patch_and_each_lead_moves_once(store, fake, sales):
    planned = [move(sales, lead) for lead in sales["leads"]]
    assert record_planned(store, planned, event_id=1) == 3
    assert record_planned(store, planned, event_id=2) == 0  # the same change again: nothing new
    s = sender(store)
    s.drain()
    assert patches(fake) == 1
    [body] = [r.json for r in fake.requests_to("/api/v4/leads", "PATCH")]
    assert sorted(item["id"] for item in body) == sales["leads"]
    assert set(body[0]) == {"id", "status_id", "pipeline_id", "request_id"}  # only what changes
    assert {fake.leads[lead]["status_id"] for lead in sales["leads"]} == {sales["Proposal"]}
    assert {a.status for a in Action.select()} == {"done"}
    assert {a.result_id for a in Action.select()} == set(sales["leads"])
    # A move made by the API is logged like any other (and comes back as a change).
    assert len([e for e in fake.events if e["type"] == "lead_status_changed"]) == 3
    s.drain()
    assert patches(fake) == 1


def test_a_lost_answer_is_recognised_by_reading_the_lead(store, fake, sales):
    clock = Clock()
    record_planned(store, [move(sales, sales["leads"][0])], event_id=1)
    fake.fail("/api/v4/leads", drop=True, after_effect=True, method="PATCH")
    s = sender(store, clock)
    s.drain()
    [action] = Action.select()
    assert action.status == "sending"  # may have happened: looked up before anything is sent again
    assert fake.leads[sales["leads"][0]]["status_id"] == sales["Proposal"]
    clock.advance(3600 * 2)
    s.drain()
    [action] = Action.select()
    assert action.status == "done" and "already in the target stage" in action.last_error
    assert patches(fake) == 1
    assert len(fake.requests_to("/api/v4/leads", "GET")) == 1


def test_a_lead_moved_elsewhere_since_is_left_alone_and_the_action_says_so(store, fake, sales):
    clock = Clock()
    lead = sales["leads"][0]
    record_planned(store, [move(sales, lead)], event_id=1)
    fake.fail("/api/v4/leads", drop=True, after_effect=False, method="PATCH")  # lost, nothing done
    s = sender(store, clock)
    s.drain()
    fake.move_lead(lead, sales["New"], sales["pipeline"])  # a person moves it meanwhile
    clock.advance(3600 * 2)
    s.drain()
    [action] = Action.select()
    assert action.status == "skipped" and "moved elsewhere since the change" in action.last_error
    assert fake.leads[lead]["status_id"] == sales["New"]
    assert patches(fake) == 1


def test_a_lost_answer_with_nothing_done_is_sent_again(store, fake, sales):
    clock = Clock()
    lead = sales["leads"][0]
    record_planned(store, [move(sales, lead)], event_id=1)
    fake.fail("/api/v4/leads", drop=True, after_effect=False, method="PATCH")
    s = sender(store, clock)
    s.drain()
    clock.advance(3600 * 2)
    s.drain()
    assert fake.leads[lead]["status_id"] == sales["Proposal"]
    assert patches(fake) == 2
    assert Action.get().status == "done"


@pytest.mark.slow
def test_crash_between_patch_and_commit_moves_each_lead_once(store, fake, sales):
    record_planned(store, [move(sales, lead) for lead in sales["leads"]], event_id=1)
    fake.fail("/api/v4/leads", hang=True, after_effect=True, method="PATCH")
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_SENDER, store.url], env=cli_env(store.url), cwd=str(ROOT))
    deadline = time.time() + 30
    while patches(fake) < 1 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.kill()
    proc.wait()
    fake.clear_faults()
    assert {fake.leads[lead]["status_id"] for lead in sales["leads"]} == {sales["Proposal"]}
    assert Action.select().where(Action.status == "sending").count() == 3
    time.sleep(2.2)  # the dead sender's lease runs out
    s = sender(store)
    s.drain()
    assert patches(fake) == 1
    assert s.stats.adopted == 3
    assert {a.status for a in Action.select()} == {"done"}
    assert len([e for e in fake.events if e["type"] == "lead_status_changed"]) == 3


def test_one_refused_move_is_rejected_and_the_rest_go(store, fake, sales):
    bad = move(sales, sales["leads"][0])
    bad = PlannedAction(
        **{**bad.__dict__, "payload": {**bad.payload, "patch": {**bad.payload["patch"], "status_id": 1}}}
    )
    record_planned(store, [bad, move(sales, sales["leads"][1])], event_id=1)
    s = sender(store)
    s.drain()
    rejected = Action.get(Action.key == bad.key)
    assert rejected.status == "rejected" and "status_id" in rejected.last_error
    assert fake.leads[sales["leads"][1]]["status_id"] == sales["Proposal"]
    assert fake.leads[sales["leads"][0]]["status_id"] == sales["Qualified"]


# -- set_field ---------------------------------------------------------------------------------
def test_a_field_and_a_tag_are_set_without_touching_other_tags(store, fake, sales):
    source = fake.add_custom_field("Source", "select", enums=["Phone", "Website"])
    lead = sales["leads"][0]
    fake.leads[lead]["_embedded"]["tags"] = [{"id": 1, "name": "vip", "color": None}]
    record_planned(store, [set_field(lead, field_id=source["id"], value="Phone", tag="called")], event_id=1)
    sender(store).drain()
    assert {t["name"] for t in fake.leads[lead]["_embedded"]["tags"]} == {"vip", "called"}
    [cf] = fake.leads[lead]["custom_fields_values"]
    assert cf["field_id"] == source["id"] and cf["values"] == [{"value": "Phone"}]
    [body] = [r.json for r in fake.requests_to("/api/v4/leads", "PATCH")]
    assert "_embedded" not in body[0]  # _embedded.tags would replace every tag


def test_a_field_set_whose_answer_was_lost_is_not_sent_again(store, fake, sales):
    clock = Clock()
    budget = fake.add_custom_field("Budget", "numeric")
    lead = sales["leads"][1]
    record_planned(store, [set_field(lead, field_id=budget["id"], value=1500)], event_id=1)
    fake.fail("/api/v4/leads", drop=True, after_effect=True, method="PATCH")
    s = sender(store, clock)
    s.drain()
    clock.advance(3600 * 2)
    s.drain()
    [action] = Action.select()
    assert action.status == "done" and "already has it" in action.last_error
    assert patches(fake) == 1


def test_an_option_amocrm_does_not_know_is_rejected_with_its_reason(store, fake, sales):
    source = fake.add_custom_field("Source", "select", enums=["Phone", "Website"])
    record_planned(store, [set_field(sales["leads"][0], field_id=source["id"], value="Fax")], event_id=1)
    sender(store).drain()
    [action] = Action.select()
    assert action.status == "rejected" and "custom_fields_values.0.values.0.value" in action.last_error


# -- notify ------------------------------------------------------------------------------------
@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_a_message_is_posted_once_with_its_idempotency_key(store, account, receiver):
    planned = notify(5)
    record_planned(store, [planned], event_id=1)
    record_planned(store, [planned], event_id=2)
    s = sender(store, env={"CHAT_URL": receiver.url})
    s.drain()
    assert receiver.messages == [(idempotency_key(planned.key), {"text": "Won: Acme", "lead": {"id": 5}})]
    assert Action.get().status == "done"


def test_a_failing_receiver_is_retried_with_backoff_under_the_same_key(store, account, receiver):
    clock = Clock()
    record_planned(store, [notify(5)], event_id=1)
    receiver.answers = [503, "drop"]
    logged: list[str] = []
    s = sender(store, clock, env={"CHAT_URL": receiver.url}, log=logged.append)
    s.drain()
    action = Action.get()
    assert action.status == "sending" and action.lease_until > clock.now + 10  # backing off
    assert "$CHAT_URL answered 503" in action.last_error
    clock.advance(3600 * 2)
    s.drain()  # delivered, but the answer is lost
    action = Action.get()
    assert action.status == "sending" and "s3cr3t" not in action.last_error and "127.0.0.1" not in action.last_error
    clock.advance(3600 * 2)
    s.drain()
    assert Action.get().status == "done"
    assert len(receiver.messages) == 1  # three posts, one message: the receiver saw one key
    assert not any("s3cr3t" in line for line in logged)


def test_a_receiver_refusing_the_message_rejects_it(store, account, receiver):
    record_planned(store, [notify(5)], event_id=1)
    receiver.answers = [400]
    sender(store, env={"CHAT_URL": receiver.url}).drain()
    action = Action.get()
    assert action.status == "rejected" and action.last_error == "$CHAT_URL refused the message: HTTP 400"


def test_a_missing_url_waits_for_a_person_and_never_posts(store, account, receiver):
    record_planned(store, [notify(5)], event_id=1)
    sender(store, env={}).drain()
    action = Action.get()
    assert action.status == "pending" and "CHAT_URL is not set" in action.last_error and action.attempts == 0
    assert receiver.messages == []


NOTIFY_RULE = """
[[rule]]
name = "new leads to the chat"
when = "lead.added"
[rule.notify]
url_env = "CHAT_URL"
json = { text = "New: {lead.name}" }
"""


def test_a_backslash_cannot_pass_a_remote_http_url_off_as_localhost(store, account, receiver, tmp_path):
    """urlsplit reads the host after the ``@``; requests (urllib3's parse_url) stops the host at
    the backslash and connects to the host before it. The check must read it as requests does."""
    port = receiver.server.server_address[1]
    tricky = f"http://127.0.0.2:{port}\\@127.0.0.1/x"
    rules = tmp_path / "rules.toml"
    rules.write_text(NOTIFY_RULE)
    result = run_cli(["rules", "check", "--rules", str(rules)], store.url, env=cli_env(store.url, CHAT_URL=tricky))
    assert result.returncode == 2 and "CHAT_URL" in result.stderr, result.stderr
    assert "127.0.0.2" not in result.stderr and "Traceback" not in result.stderr
    # A URL changed after `rules check`: the sender checks again and never connects.
    second = Receiver(host="127.0.0.2")
    try:
        record_planned(store, [notify(5)], event_id=1)
        sender(store, env={"CHAT_URL": f"http://127.0.0.2:{second.port}\\@127.0.0.1/x"}).drain()
        action = Action.get()
        assert action.status == "pending" and "CHAT_URL" in action.last_error
        assert second.connections == 0 and second.messages == []
    finally:
        second.close()


@pytest.mark.parametrize(
    "url, ok",
    [
        ("http://127.0.0.1:8080/hook", True),
        ("http://LOCALHOST/hook", True),
        ("http://[::1]:81/hook", True),
        ("https://chat.example.com/hook/s3cr3t", True),
        ("http://127.0.0.2:8080\\@127.0.0.1/x", False),
        ("http://127.0.0.1@chat.example.com/x", False),
        ("http://chat.example.com#@127.0.0.1/", False),
        ("http://127.0.0.1/x\n", False),
        (" http://127.0.0.1/x", False),
        ("http://localhost.evil.com/x", False),
        ("ftp://127.0.0.1/x", False),
        ("127.0.0.1/x", False),
    ],
)
def test_the_url_check_reads_the_host_requests_connects_to(url, ok):
    from amohook.actions.notify import url_problem

    assert (url_problem(url) is None) == ok, url_problem(url)
