"""Reconciliation from amoCRM's events log: every change gets its task once, whichever way it came.

Webhooks arrive through the listener's own write path (parse + store_deliveries); the events log,
the leads and the subscriptions live in the fake amoCRM; workers, `reconcile` and `webhooks` run
as the real CLI. Every test runs on SQLite, MariaDB and PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest

from amohook.amocrm.client import client_for
from amohook.recovery.reconcile import OVERLAP, reconcile_account
from amohook.store.models import Account, Action, ChangeSeen, Event, ReconcileState
from tests.conftest import cli_env, run_cli
from tests.helpers.reconcile import amohook_process, connected_ago, deliver, new_leads, reconcile, tasks_per_lead, work


@pytest.fixture(autouse=True)
def store_in_service(request):
    """These tests model a store in service for a while (connected two hours ago): reconciliation
    reads nothing from before the connection (tests/recovery/test_reconcile_stores.py: fresh stores)."""
    if "crm" in request.fixturenames:
        request.getfixturevalue("crm")
        connected_ago(request.getfixturevalue("store"), 7200)


def test_leads_moved_while_the_listener_was_down_each_get_one_task(store, fake, crm):
    leads = new_leads(fake, crm, 50)
    start = int(time.time()) - 1800
    for i, lead in enumerate(leads):  # half an hour of moves; no webhook reached amohook
        fake.move_lead(lead, crm["qualified"], crm["pipeline"], at=start + i * 30)
    summary = reconcile(store)
    assert (summary["read"], summary["queued"], summary["known"]) == (50, 50, 0)
    work(store, crm)
    assert tasks_per_lead(fake) == {lead: 1 for lead in leads}
    assert {t["responsible_user_id"] for t in fake.tasks.values()} == {crm["anna"]}
    assert all(t["text"].startswith("Call Lead ") for t in fake.tasks.values())
    # Read again (the overlap re-reads the last 10 minutes): known now, nothing queued or sent twice.
    again = reconcile(store)
    assert again["queued"] == 0 and again["known"] == again["read"] and 9 <= again["read"] <= 11
    work(store, crm)
    assert len(fake.tasks) == 50
    # The lead reads were batched, not one per lead.
    assert len(fake.requests_to("/api/v4/leads", "GET")) == 1
    assert Event.select().where(Event.source == "events_log").count() == 50


def test_a_webhook_then_its_log_entry_make_one_task(store, fake, crm):
    [lead] = new_leads(fake, crm, 1)
    at = int(time.time()) - 60
    item = fake.move_lead(lead, crm["qualified"], crm["pipeline"], at=at, log_offset=3)
    deliver(store, fake, "status", [item])
    work(store, crm)
    assert len(fake.tasks) == 1
    summary = reconcile(store)
    assert (summary["read"], summary["known"], summary["queued"]) == (1, 1, 0)
    work(store, crm)
    assert len(fake.tasks) == 1
    [seen] = ChangeSeen.select()
    assert (seen.hook_at, seen.key_at, seen.first_source) == (at, at, "webhook")


def test_a_log_entry_then_a_late_webhook_retry_make_one_task(store, fake, crm):
    [lead] = new_leads(fake, crm, 1)
    at = int(time.time()) - 120
    item = fake.move_lead(lead, crm["qualified"], crm["pipeline"], at=at, log_offset=-4)
    assert reconcile(store)["queued"] == 1
    work(store, crm)
    assert len(fake.tasks) == 1
    deliver(store, fake, "status", [item])  # amoCRM's retry, minutes later
    deliver(store, fake, "update", [{**item, "old_status_id": str(crm["new"])}])  # and the update hook
    work(store, crm)
    assert len(fake.tasks) == 1
    [seen] = ChangeSeen.select()
    assert seen.first_source == "events_log" and seen.log_at == at - 4 and seen.hook_at == at
    # Replaying every event, log and webhook alike, still makes nothing new.
    ids = [str(e.id) for e in Event.select()]
    assert run_cli(["events", "replay", *ids], store.url).returncode == 0
    work(store, crm)
    assert len(fake.tasks) == 1
    assert Action.select().count() == 1


def test_a_lead_moved_back_and_forth_gets_a_task_per_entry(store, fake, crm):
    [lead] = new_leads(fake, crm, 1)
    t = int(time.time()) - 300
    first = fake.move_lead(lead, crm["qualified"], crm["pipeline"], at=t, log_offset=1)
    back = fake.move_lead(lead, crm["new"], crm["pipeline"], at=t + 60, log_offset=1)
    second = fake.move_lead(lead, crm["qualified"], crm["pipeline"], at=t + 120, log_offset=1)
    deliver(store, fake, "status", [first])
    deliver(store, fake, "status", [back])
    work(store, crm)
    reconcile(store)  # brings the second entry into Qualified, whose webhook was lost
    deliver(store, fake, "status", [second])  # ... then it arrives after all
    work(store, crm)
    assert len(fake.tasks) == 2


def test_handlers_see_where_an_event_came_from(store, fake, crm):
    from amohook.recovery.identity import ChangeJournal
    from amohook.worker import Registry, Worker

    [a, b] = new_leads(fake, crm, 2)
    deliver(store, fake, "status", [fake.move_lead(a, crm["qualified"], crm["pipeline"])])
    fake.move_lead(b, crm["qualified"], crm["pipeline"])
    seen: list[tuple[str, str]] = []
    registry = Registry()
    registry.register("amohook.changes", ChangeJournal(store))
    registry.register("record", lambda event, ctx: seen.append((event.entity_id, event.source)))
    worker = Worker(store, registry, "test-worker")
    worker.drain()
    reconcile_account(store, client_for(store, "example"), "example")
    worker.drain()
    assert sorted(seen) == sorted([(str(a), "webhook"), (str(b), "events_log")])


def test_the_cursor_survives_a_restart_and_the_next_pass_overlaps_it(store, fake, crm):
    first = reconcile(store, "--since", "2h")  # as far back as the store's connection, two hours ago
    assert 7200 <= first["window_to"] - first["window_from"] <= 7205
    cursor = ReconcileState.get(ReconcileState.account == "example").cursor
    assert cursor == first["window_to"]
    second = reconcile(store)  # a new process: reads from the stored cursor
    assert second["window_from"] == cursor - OVERLAP
    third = reconcile(store, "--since", "2h")  # the explicit catch-up reaches back further
    assert 7200 <= third["window_to"] - third["window_from"] <= 7205


def test_an_idle_account_costs_one_request_per_pass(store, fake, crm):
    reconcile(store)
    fake.clear_requests()
    for _ in range(3):
        reconcile(store)
    api = [r for r in fake.requests if r.path.startswith("/api/")]
    assert [r.path for r in api] == ["/api/v4/events"] * 3


def test_an_outage_longer_than_the_look_back_is_capped_and_said(store, fake, crm):
    [lead] = new_leads(fake, crm, 1)
    now = int(time.time())
    connected_ago(store, 30 * 86400)
    with store.write():
        ReconcileState.insert(account="example", cursor=now - 10 * 86400).execute()
    fake.move_lead(lead, crm["qualified"], crm["pipeline"], at=now - 3 * 86400)  # outside a 1-day look-back
    result = run_cli(["reconcile", "--max-lookback", "1d"], store.url)
    assert result.returncode == 0, result.stderr
    assert "left out" in result.stderr and "--max-lookback" in result.stderr
    summary = reconcile(store, "--max-lookback", "7d")
    assert summary["left_out_from"] is None


def test_a_crash_mid_pass_is_finished_by_the_next_pass_without_repeats(store, fake, crm):
    from amohook.amocrm.events import fetch_events
    from amohook.recovery.reconcile import EVENT_ACTIONS, _queue, webhook_item

    leads = new_leads(fake, crm, 30)
    start = int(time.time()) - 600
    for i, lead in enumerate(leads):
        fake.move_lead(lead, crm["qualified"], crm["pipeline"], at=start + i)
    # A pass that committed its first chunk and died: 10 queued, the cursor never moved.
    events = fetch_events(
        client_for(store, "example"), types=list(EVENT_ACTIONS), created_from=start - 10, created_to=int(time.time())
    )
    first = [(e, *webhook_item(e, fake.leads[e["entity_id"]])) for e in events[:10]]
    assert _queue(store, "example", first, time.time()) == 10
    assert ReconcileState.get_or_none(ReconcileState.account == "example") is None
    summary = reconcile(store)
    assert (summary["queued"], summary["known"]) == (20, 10)
    work(store, crm)
    assert tasks_per_lead(fake) == {lead: 1 for lead in leads}


@pytest.mark.slow
def test_a_failed_pass_keeps_the_cursor(store, fake, crm):
    [lead] = new_leads(fake, crm, 1)
    fake.move_lead(lead, crm["qualified"], crm["pipeline"])
    fake.fail("/api/v4/leads", status=500, times=None, method="GET")
    result = run_cli(["reconcile"], store.url)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    state = ReconcileState.get(ReconcileState.account == "example")
    assert state.cursor is None and state.last_error
    fake.clear_faults()
    assert reconcile(store)["queued"] == 1


@pytest.mark.slow
def test_two_processes_reconciling_at_once_make_one_pass(store, fake, crm):
    leads = new_leads(fake, crm, 3)
    for lead in leads:
        fake.move_lead(lead, crm["qualified"], crm["pipeline"])
    fake.fail("/api/v4/events", delay=6.0, times=1)  # a slow first pass, even when loaded
    procs = [amohook_process(store.url, ["reconcile", "--json"]) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    summaries = [json.loads(out)[0] for out, _ in outs]
    assert sorted(s["busy"] for s in summaries) == [False, True]
    assert sum(s["queued"] for s in summaries) == 3
    assert Event.select().count() == 3


@pytest.mark.slow
def test_the_worker_alone_turns_log_entries_into_tasks(store, fake, crm):
    leads = new_leads(fake, crm, 3)
    proc = amohook_process(
        store.url, ["worker", "--rules", crm["rules"], "--reconcile", "1s", "--poll", "0.1", "--log-level", "warning"]
    )
    try:
        time.sleep(0.5)
        for lead in leads:
            fake.move_lead(lead, crm["qualified"], crm["pipeline"])
        deadline = time.time() + 30
        while time.time() < deadline and len(fake.tasks) < 3:
            time.sleep(0.1)
        time.sleep(1.5)  # another pass or two: nothing may be created twice
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert tasks_per_lead(fake) == {lead: 1 for lead in leads}, err
    assert "reconciliation: every 1s" in out


@pytest.mark.parametrize("reenable_on_repost", [True, False])
def test_a_switched_off_subscription_is_switched_back_on(store, fake, crm, reenable_on_repost):
    fake.reenable_on_repost = reenable_on_repost
    url = "https://hooks.example.com/webhook/s3cret-s3cret-s3cret"
    result = run_cli(["webhooks", "subscribe", "--url", url, "--rules", crm["rules"]], store.url)
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    [hook] = fake.webhooks
    assert hook["destination"] == url and hook["settings"] == ["status_lead"]
    fake.disable_webhook(url)
    summary = reconcile(store)
    assert summary["subscription"] == "re-enabled"
    [hook] = fake.webhooks
    assert hook["destination"] == url and not hook["disabled"]
    status = json.loads(run_cli(["status", "--json"], store.url).stdout)[0]["reconciliation"]
    assert status["subscription"] == "re-enabled"
    assert reconcile(store)["subscription"] == "ok"


def test_a_removed_subscription_is_reported_missing(store, fake, crm):
    url = "https://hooks.example.com/webhook/another-secret-value"
    assert run_cli(["webhooks", "subscribe", "--url", url], store.url).returncode == 0
    fake.webhooks.clear()
    result = run_cli(["reconcile"], store.url)
    assert result.returncode == 0
    assert "missing" in result.stdout
    assert "another-secret-value" not in result.stdout + result.stderr


def test_a_subscription_the_watchdog_removed_is_added_back_when_its_post_failed(store, fake, crm):
    """Switching on ends with DELETE then POST; a 502 on that POST must not leave the destination
    gone for good, nor later passes blame a person for removing it (#15.6)."""
    fake.reenable_on_repost = False  # re-posting leaves it off: the watchdog removes and adds it
    url = "https://hooks.example.com/webhook/s3cret-s3cret-s3cret"
    assert run_cli(["webhooks", "subscribe", "--url", url, "--rules", crm["rules"]], store.url).returncode == 0
    fake.disable_webhook(url)
    fake.fail("/api/v4/webhooks", 502, method="POST", skip=1)  # the re-post passes, the re-add fails
    first = reconcile(store)
    assert "subscription check failed" in first["subscription_note"]
    assert fake.webhooks == []  # gone, by amohook's own DELETE
    second = reconcile(store)
    assert second["subscription"] == "re-enabled", second
    [hook] = fake.webhooks
    assert hook["destination"] == url and not hook["disabled"] and hook["settings"] == ["status_lead"]
    third = reconcile(store)
    assert third["subscription"] == "ok" and not third["subscription_note"]
    fake.webhooks.clear()  # now someone else removes it: that is reported, not undone
    assert reconcile(store)["subscription"] == "missing" and fake.webhooks == []


def test_the_watchdog_looks_on_every_background_pass(store, fake, crm):
    from amohook.recovery.reconcile import Reconciler

    url = "https://hooks.example.com/webhook/s3cret-s3cret-s3cret"
    assert run_cli(["webhooks", "subscribe", "--url", url], store.url).returncode == 0
    fake.clear_requests()
    reconciler = Reconciler(store, 60, client_factory=lambda s, a: client_for(s, a))
    reconciler.run_once()
    fake.disable_webhook(url)
    [result] = reconciler.run_once()
    assert len(fake.requests_to("/api/v4/webhooks", "GET")) >= 2
    assert result.subscription == "re-enabled" and not fake.webhooks[0]["disabled"]


def test_without_an_admin_token_reconciliation_still_runs(store, fake, crm):
    [lead] = new_leads(fake, crm, 1)
    access, refresh = fake.issue_tokens(admin=False)
    with store.write():
        Account.update(access_token=access, refresh_token=refresh).execute()
    url = "https://hooks.example.com/webhook/s3cret-s3cret-s3cret"
    result = run_cli(["webhooks", "subscribe", "--url", url], store.url)
    assert result.returncode != 0 and "admin" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    from amohook.recovery.watchdog import remember

    remember(store, "example", url, ["status_lead"])  # as if an admin had subscribed it before
    fake.move_lead(lead, crm["qualified"], crm["pipeline"])
    summary = reconcile(store)
    assert summary["queued"] == 1
    assert summary["subscription"] == "unknown" and "admin" in summary["subscription_note"]


def test_webhooks_list_and_unsubscribe(store, fake, crm):
    url = "https://hooks.example.com/webhook/list-secret-value-123"
    assert (
        run_cli(["webhooks", "subscribe", "--url", url, "--events", "status_lead,update_lead"], store.url).returncode
        == 0
    )
    listed = json.loads(run_cli(["webhooks", "list", "--json"], store.url).stdout)
    assert listed == [
        {
            "destination": "https://hooks.example.com/webhook/***",
            "events": ["status_lead", "update_lead"],
            "disabled": False,
            "by_amohook": True,
        }
    ]
    bad = run_cli(["webhooks", "subscribe", "--url", url, "--events", "status_leed"], store.url)
    assert bad.returncode == 2 and "status_lead" in bad.stderr
    plain = run_cli(
        ["webhooks", "subscribe", "--url", "http://hooks.example.com/webhook/list-secret-value-123"], store.url
    )
    assert plain.returncode == 0 and "not https" in plain.stderr
    assert run_cli(["webhooks", "unsubscribe", "--url", url], store.url).returncode == 0
    assert [h["destination"] for h in fake.webhooks] == ["http://hooks.example.com/webhook/list-secret-value-123"]
    gone = run_cli(["webhooks", "unsubscribe", "--url", url], store.url)
    assert gone.returncode == 2 and "webhooks list" in gone.stderr


def test_status_shows_reconciliation_per_account(store, fake, crm):
    [lead] = new_leads(fake, crm, 1)
    fake.move_lead(lead, crm["qualified"], crm["pipeline"])
    reconcile(store)
    work(store, crm)
    [row] = json.loads(run_cli(["status", "--json"], store.url).stdout)
    info = row["reconciliation"]
    assert info["recovered_24h"] == 1 and info["cursor_lag_seconds"] is not None and info["last_pass_at"]
    text = run_cli(["status"], store.url).stdout
    assert "1 change(s) recovered in 24 h" in text


@pytest.mark.slow
def test_a_concurrent_webhook_and_log_event_for_one_change_make_one_task(store, fake, crm):
    """Two workers take the webhook and the log entry of one change at the same moment."""
    leads = new_leads(fake, crm, 20)
    at = int(time.time()) - 100
    items = [
        fake.move_lead(lead, crm["qualified"], crm["pipeline"], at=at + i, log_offset=2) for i, lead in enumerate(leads)
    ]
    deliver(store, fake, "status", items)
    reconcile(store)  # nothing processed yet: all 20 log entries are queued beside the webhooks
    procs = [
        amohook_process(store.url, ["worker", "--rules", crm["rules"], "--once", "--reconcile", "off", "--batch", "1"])
        for _ in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    work(store, crm)
    assert tasks_per_lead(fake) == {lead: 1 for lead in leads}


@pytest.mark.slow
def test_healthz_shows_reconciliation_per_account(store, fake, crm):
    import requests

    from tests.helpers.e2e import Serve

    [lead] = new_leads(fake, crm, 1)
    fake.move_lead(lead, crm["qualified"], crm["pipeline"])
    reconcile(store)
    work(store, crm)
    serve = Serve(store.url, "--workers", "0", "--reconcile", "off")
    try:
        # /healthz answers from its last read of the store; the first read may still be under way
        # on a busy machine (its reconciliation is then empty).
        end = time.monotonic() + 10
        while not (health := requests.get(f"{serve.url}/healthz", timeout=5).json())["reconciliation"]:
            assert time.monotonic() < end, health
            time.sleep(0.1)
    finally:
        serve.stop()
    [row] = health["reconciliation"]
    assert row["account"] == "example" and row["recovered_24h"] == 1
    assert row["cursor_lag"] is not None and row["subscription"] == "unknown" and row["last_error"] is False


def test_odd_log_entries_are_passed_over_not_fatal(store, fake, crm):
    [lead] = new_leads(fake, crm, 1)
    fake.move_lead(lead, crm["qualified"], crm["pipeline"])
    now = int(time.time())
    fake.add_event("lead_status_changed", "not-a-number", value_after=[{"lead_status": {"id": 1}}], at=now)
    fake.add_event("lead_status_changed", lead, value_after=[{"nothing": 1}], at=now)
    fake.add_event("entity_responsible_changed", lead, value_after="junk", at=now)
    fake.add_event("lead_status_changed", "²", value_after=[{"lead_status": {"id": 1, "pipeline_id": 2}}], at=now)
    floating = fake.add_event("lead_status_changed", lead + 1, value_after=[{"lead_status": {"id": 3}}], at=now)
    floating["created_at"] = now - 0.5  # a float where amoCRM documents an integer
    summary = reconcile(store)
    assert summary["queued"] == 2 and summary["read"] == 6
    assert ReconcileState.get(ReconcileState.account == "example").cursor == summary["window_to"]


@pytest.mark.slow
def test_a_failing_subscription_check_does_not_hold_the_cursor_back(store, fake, crm):
    from amohook.recovery.watchdog import remember

    [lead] = new_leads(fake, crm, 1)
    remember(store, "example", "https://hooks.example.com/webhook/x", ["status_lead"])
    fake.move_lead(lead, crm["qualified"], crm["pipeline"])
    fake.fail("/api/v4/webhooks", status=500, times=None)
    summary = reconcile(store)
    assert summary["queued"] == 1 and "subscription check failed" in summary["subscription_note"]
    assert ReconcileState.get(ReconcileState.account == "example").cursor == summary["window_to"]


def test_the_webhook_secret_is_filled_in_from_the_environment_not_the_command_line(store, fake, crm):
    secret = "env-only-secret-0123456789"
    env = cli_env(store.url, AMOHOOK_WEBHOOK_SECRET=secret)
    result = run_cli(
        ["webhooks", "subscribe", "--url", "https://hooks.example.com/webhook/{secret}"], store.url, env=env
    )
    assert result.returncode == 0, result.stderr
    assert [h["destination"] for h in fake.webhooks] == [f"https://hooks.example.com/webhook/{secret}"]
    assert secret not in result.stdout + result.stderr
    missing = run_cli(["webhooks", "subscribe", "--url", "https://hooks.example.com/webhook/{secret}"], store.url)
    assert missing.returncode == 2 and "AMOHOOK_WEBHOOK_SECRET" in missing.stderr
    gone = run_cli(
        ["webhooks", "unsubscribe", "--url", "https://hooks.example.com/webhook/{secret}"], store.url, env=env
    )
    assert gone.returncode == 0 and fake.webhooks == []


def test_a_huge_log_entry_is_stored_bounded_and_odd_ones_are_noted_within_bounds(store, fake, crm):
    """An entry of megabytes (here 3 MB in value_before, 1 MB in created_by) is not stored verbatim."""
    from amohook.recovery.reconcile import ENTRY_MAX, NOTES_MAX
    from amohook.store.models import Delivery

    [lead, other] = new_leads(fake, crm, 2)
    now = int(time.time())
    after = [{"lead_status": {"id": crm["qualified"], "pipeline_id": crm["pipeline"]}}]
    before = [{"lead_status": {"id": crm["new"], "pipeline_id": crm["pipeline"]}, "junk": "x" * 3_000_000}]
    fake.add_event("lead_status_changed", lead, value_after=after, value_before=before, at=now)
    fake.add_event("lead_status_changed", other, value_after=after, created_by="9" * 1_000_000, at=now)
    for i in range(NOTES_MAX + 5):
        fake.add_event("lead_status_changed", other + 1 + i, value_after=after, created_by="7" * 100, at=now)
    summary = reconcile(store)
    assert summary["queued"] == 1, summary
    [event] = Event.select().where(Event.source == "events_log")
    assert event.entity_id == str(lead) and len(event.data) < 2000
    body = Delivery.get_by_id(event.delivery_id).body
    assert len(body.encode()) <= ENTRY_MAX and json.loads(body)["entity_id"] == str(lead)
    assert "cut to its scalar fields" in body
    state = ReconcileState.get(ReconcileState.account == "example")
    assert len(state.last_pass_summary) < 10_000
    assert json.loads(state.last_pass_summary)["notes"][-1] == "and 6 more note(s)"


def test_a_pass_held_by_a_killed_process_says_until_when(store, fake, crm):
    """A killed pass leaves its lease for up to 15 minutes: a pass then says who and until when."""
    from amohook.store import lease as leases

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    dead = f"{socket.gethostname()}:{proc.stdout.strip()}:1:deadbeef"
    assert leases.try_acquire("reconcile:example", dead, 900)
    result = run_cli(["reconcile"], store.url)
    assert result.returncode == 0, result.stderr
    assert "no longer running" in result.stdout and "UTC" in result.stdout and "skipped" in result.stdout
    summary = json.loads(run_cli(["reconcile", "--json"], store.url).stdout)[0]
    assert summary["busy"] and "held until" in summary["notes"][0]
    leases.release("reconcile:example", dead)
    alive = "otherhost:4242:1:abcd1234"
    assert leases.try_acquire("reconcile:example", alive, 900)
    busy = run_cli(["reconcile"], store.url)
    assert "(otherhost:4242)" in busy.stdout and "runs out at" in busy.stdout


@pytest.mark.parametrize("known", [True, False], ids=["secret-in-env", "secret-not-in-env"])
def test_a_secret_outside_a_webhook_segment_is_never_shown(store, fake, crm, caplog, known):
    """A proxy may map ``/amo/<secret>`` to the listener: subscribe, list (text and JSON), the
    watchdog's warnings and its notes (reconcile, status, doctor) cut the secret all the same,
    whether or not this process has it in its environment."""
    secret = "Amo-Path-Secret-0123456789xyz"
    url = f"https://hooks.example.com/amo/{secret}"
    env = cli_env(store.url, AMOHOOK_WEBHOOK_SECRET=secret) if known else cli_env(store.url)
    written: list[str] = []

    def cli(*args: str) -> subprocess.CompletedProcess:
        result = run_cli(list(args), store.url, env=env)
        written.append(result.stdout + result.stderr)
        return result

    subscribed = cli("webhooks", "subscribe", "--url", "https://hooks.example.com/amo/{secret}" if known else url)
    assert subscribed.returncode == 0, subscribed.stderr
    assert "https://hooks.example.com/amo/***" in subscribed.stdout
    assert [h["destination"] for h in fake.webhooks] == [url]
    assert "https://hooks.example.com/amo/***" in cli("webhooks", "list").stdout
    [row] = json.loads(cli("webhooks", "list", "--json").stdout)
    assert row["destination"] == "https://hooks.example.com/amo/***" and row["by_amohook"]
    fake.disable_webhook(url)
    with caplog.at_level(logging.WARNING, logger="amohook"):
        cli("reconcile")
        cli("status")
        cli("doctor")
        fake.webhooks.clear()
        cli("reconcile", "--json")
        cli("status", "--json")
    # The watchdog's warnings: logged in this process, or on stderr of a process of their own
    # (AMOHOOK_TEST_SUBPROCESS=1).
    notes = [r.getMessage() for r in caplog.records if r.name.startswith("amohook.")] + written
    assert any("hooks.example.com/amo/***" in n and "switching it back on" in n for n in notes), notes
    everything = "\n".join(notes)
    assert "switching it back on" in everything and "is on again" in everything and "missing" in everything
    assert secret not in everything and secret.lower() not in everything.lower()
    assert secret[: len(secret) // 2] not in everything
