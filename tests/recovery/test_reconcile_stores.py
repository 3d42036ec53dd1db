"""Reconciliation across stores and clocks: a store never repeats another store's work, a catch-up
finds the tasks amoCRM already holds, a dry run writes nothing, odd log entries and pages cost
nothing else, amoCRM's clock bounds the window, and the logs say what a person needs to see.

Store A is the ``store`` fixture; store B, where a test needs a second store on the same fake
account, is another database of the same backend, set up and run by the real CLI in processes of
its own (the models bind to one store per process).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amohook.amocrm.client import client_for
from amohook.errors import ExitCode
from amohook.recovery.reconcile import Reconciler, reconcile_account
from amohook.store import open_store
from amohook.store.models import Action, ChangeSeen, Delivery, Event, ReconcileState
from amohook.times import iso_time
from tests.conftest import ROOT, cli_env, make_database, run_cli
from tests.helpers.e2e import init_args
from tests.helpers.reconcile import connected_ago, deliver, new_leads, reconcile, tasks_per_lead, work


@pytest.fixture(autouse=True)
def store_in_service(request):
    """Store A has been in service for two hours (connected then), as in tests/recovery/test_reconcile.py."""
    if "crm" in request.fixturenames:
        request.getfixturevalue("crm")
        connected_ago(request.getfixturevalue("store"), 7200)


def backend_of(url: str) -> str:
    return {"sqlite": "sqlite", "mysql": "mysql", "postgresql": "postgres"}[url.split(":", 1)[0]]


def cli(url: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """The real `amohook` in a process of its own, on the store at ``url``."""
    return subprocess.run(
        [sys.executable, "-m", "amohook", *args],
        env=cli_env(url, **env),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
    )


@pytest.fixture
def second_store(store, fake, tmp_path):
    """Store B on the same fake account, connected now by `init-auth` and `sync-entities`."""
    (tmp_path / "b").mkdir()
    url, drop = make_database(backend_of(store.url), tmp_path / "b")
    result = cli(url, init_args(fake, fake.issue_code()), AMOHOOK_CLIENT_SECRET=fake.client_secret)
    assert result.returncode == 0, result.stderr
    assert cli(url, ["sync-entities"]).returncode == 0
    # B's setup spent the account's requests of this second (amoCRM's 7 per second), and the two
    # stores share no rate limiter: let the second pass before A's commands run.
    time.sleep(1.0)
    yield url
    drop()


def moved_before(fake, crm, n: int, ago: int = 1800) -> list[int]:
    """``n`` leads moved to Qualified ``ago`` seconds back (no webhook), one a second."""
    leads = new_leads(fake, crm, n)
    start = int(time.time()) - ago
    for i, lead in enumerate(leads):
        fake.move_lead(lead, crm["qualified"], crm["pipeline"], at=start + i)
    return leads


@pytest.mark.slow
def test_a_second_store_creates_nothing_for_changes_from_before_it_existed(store, fake, crm, second_store):
    leads = moved_before(fake, crm, 5)
    assert reconcile(store)["queued"] == 5
    work(store, crm)
    assert tasks_per_lead(fake) == {lead: 1 for lead in leads}
    # Store B was connected just now (a move to MySQL, a wiped database): its first look starts there.
    result = cli(second_store, ["reconcile", "--json"])
    assert result.returncode == 0, result.stderr
    [summary] = json.loads(result.stdout)
    assert summary["queued"] == 0 and summary["read"] == 0
    assert cli(second_store, ["worker", "--rules", crm["rules"], "--once", "--reconcile", "off"]).returncode == 0
    assert len(fake.tasks) == 5
    # What happens after B was connected is B's to act on.
    time.sleep(1.1)
    [later] = new_leads(fake, crm, 1, start=7900)
    fake.move_lead(later, crm["qualified"], crm["pipeline"])
    [summary] = json.loads(cli(second_store, ["reconcile", "--json"]).stdout)
    assert summary["queued"] == 1
    assert cli(second_store, ["worker", "--rules", crm["rules"], "--once", "--reconcile", "off"]).returncode == 0
    assert tasks_per_lead(fake) == {**{lead: 1 for lead in leads}, later: 1}


@pytest.mark.slow
def test_a_catch_up_finds_the_tasks_another_store_made(store, fake, crm, second_store):
    leads = moved_before(fake, crm, 5)
    reconcile(store)
    work(store, crm)
    made_by_a = sorted(fake.tasks)
    # B reads back an hour on purpose: the same five changes, none of them known to B.
    result = cli(second_store, ["reconcile", "--json", "--since", "1h"])
    assert result.returncode == 0, result.stderr
    [summary] = json.loads(result.stdout)
    assert summary["queued"] == 5 and summary["known"] == 0
    worked = cli(second_store, ["worker", "--rules", crm["rules"], "--once", "--reconcile", "off"])
    assert worked.returncode == 0, worked.stderr
    assert sorted(fake.tasks) == made_by_a  # nothing made twice
    assert tasks_per_lead(fake) == {lead: 1 for lead in leads}
    assert worked.stderr.count("already in amoCRM for this change") == 5, worked.stderr
    assert len(fake.requests_to("/api/v4/tasks", "POST")) == 1  # A's one batch; B posted none


def test_a_task_from_before_the_change_is_not_taken_for_its_task(store, fake, crm):
    [lead] = new_leads(fake, crm, 1)
    at = int(time.time()) - 600
    # The same rule made the same task when the lead entered Qualified an hour earlier.
    fake.tasks[99] = {
        "id": 99,
        "entity_id": lead,
        "entity_type": "leads",
        "text": "Call Lead 0 about the offer",
        "task_type_id": crm["call"],
        "responsible_user_id": crm["anna"],
        "complete_till": at,
        "created_at": at - 3600,
        "is_completed": True,
    }
    fake.move_lead(lead, crm["qualified"], crm["pipeline"], at=at)
    assert reconcile(store)["queued"] == 1
    work(store, crm)
    assert tasks_per_lead(fake) == {lead: 2}


def test_a_dry_run_shows_the_catch_up_and_writes_nothing(store, fake, crm):
    from tests.helpers.reconcile import deliver

    [seen, lost] = new_leads(fake, crm, 2)
    at = int(time.time()) - 300
    deliver(store, fake, "status", [fake.move_lead(seen, crm["qualified"], crm["pipeline"], at=at)])
    work(store, crm)  # the webhook brought this one: known
    fake.move_lead(lost, crm["qualified"], crm["pipeline"], at=at + 5)

    def rows() -> tuple[int, ...]:
        return tuple(m.select().count() for m in (Delivery, Event, Action, ChangeSeen, ReconcileState))

    before, tasks = rows(), dict(fake.tasks)
    fake.clear_requests()
    result = run_cli(["reconcile", "--dry-run", "--rules", crm["rules"], "--json"], store.url)
    assert result.returncode == 0, result.stderr
    [preview] = json.loads(result.stdout)
    assert (preview["read"], preview["known"], preview["new"]) == (2, 1, 1)
    assert [k["lead_id"] for k in preview["known_changes"]] == [str(seen)]
    [change] = preview["changes"]
    assert change["lead_id"] == lost
    [action] = change["actions"]
    assert action["kind"] == "create_task" and action["payload"]["text"] == "Call Lead 1 about the offer"
    assert not action["already_recorded"]
    text = run_cli(["reconcile", "--dry-run", "--rules", crm["rules"]], store.url)
    assert text.returncode == 0 and "would plan create_task: 'Call Lead 1 about the offer'" in text.stdout
    assert "nothing written" in text.stdout
    assert rows() == before and fake.tasks == tasks
    assert not fake.requests_to("/api/v4/tasks", "POST")
    # The real pass then does what the preview said.
    assert reconcile(store)["queued"] == 1


# -- odd entries: skipped and noted, on every backend -------------------------------------------
ODD_IDS = [10**19 + 7, "9" * 20, "9" * 70, -5, "-5", 1.5, "12a", True]


def test_entries_the_store_cannot_hold_are_skipped_and_noted(store, fake, crm):
    leads = new_leads(fake, crm, 3)
    now = int(time.time())
    for lead in leads:
        fake.move_lead(lead, crm["qualified"], crm["pipeline"], at=now - 30)
    status = [{"lead_status": {"id": crm["qualified"], "pipeline_id": crm["pipeline"]}}]
    for odd in ODD_IDS:
        fake.add_event("lead_status_changed", odd, value_after=status, at=now - 20)  # type: ignore[arg-type]
    odd_account = fake.add_event("lead_status_changed", leads[0] + 100, value_after=status, at=now - 20)
    odd_account["account_id"] = int("7" * 70)
    odd_stage = [{"lead_status": {"id": int("8" * 25), "pipeline_id": crm["pipeline"]}}]
    fake.add_event("lead_status_changed", leads[0] + 101, value_after=odd_stage, at=now - 20)
    result = run_cli(["reconcile", "--json"], store.url)
    assert result.returncode == 0, result.stderr
    [summary] = json.loads(result.stdout)
    assert summary["queued"] == 3 and summary["skipped"] == len(ODD_IDS) + 2
    assert summary["read"] == 3 + len(ODD_IDS) + 2
    assert sum("skipped events-log entry" in note for note in summary["notes"]) == len(ODD_IDS) + 2
    assert any("digits" in note for note in summary["notes"]) and any("negative" in note for note in summary["notes"])
    cursor = ReconcileState.get(ReconcileState.account == "example").cursor
    assert iso_time(cursor) == summary["window_to"]
    work(store, crm)
    assert tasks_per_lead(fake) == {lead: 1 for lead in leads}
    fake.add_event("lead_status_changed", "9" * 30, value_after=status)
    # The text output says so on stderr (the overlap reads the earlier ones again: 10 + 1).
    text = run_cli(["reconcile"], store.url)
    assert text.returncode == 0 and "11 events-log entries could not be stored" in text.stderr, text.stderr
    assert "digits" in text.stderr and "and 10 more" in text.stderr


def test_a_row_the_database_refuses_costs_only_itself(store, fake, crm):
    """Past the checks: should the database refuse one row anyway, the chunk is written row by row."""
    from amohook.recovery.reconcile import PassResult, _queue, webhook_item

    if store.is_sqlite:
        pytest.skip("SQLite stores any length in a text column: nothing to refuse")
    leads = new_leads(fake, crm, 3)
    for lead in leads:
        fake.move_lead(lead, crm["qualified"], crm["pipeline"])
    entries = []
    for event in fake.events:
        shaped = webhook_item(event, fake.leads[event["entity_id"]])
        assert shaped is not None
        entries.append((event, *shaped))
    entries[1] = (entries[1][0], entries[1][1], {**entries[1][2], "account_id": "7" * 70})  # too long for its column
    result = PassResult(account="example")
    assert _queue(store, "example", entries, time.time(), result) == 2
    assert result.skipped == 1 and "refused" in result.notes[0]
    assert Event.select().count() == 2


# -- malformed pages: amoCRM's fault, exit 4 ------------------------------------------------------
MALFORMED = {
    "a JSON list": ([{"id": "x"}], "a list instead of an object"),
    "a non-object next": ({"_links": {"next": "page=2"}, "_embedded": {"events": [{"id": "a"}]}}, "`next` link"),
    "a numeric href": ({"_links": {"next": {"href": 2}}, "_embedded": {"events": [{"id": "a"}]}}, "href"),
    "events not a list": ({"_embedded": {"events": {"id": "a"}}}, "_embedded.events"),
}


@pytest.mark.parametrize("shape", sorted(MALFORMED))
def test_a_malformed_events_page_is_amocrms_fault(sqlite_url, fake, shape):
    from tests.conftest import run_cli_here

    body, needle = MALFORMED[shape]
    _connect(sqlite_url, fake)
    fake.fail("/api/v4/events", status=200, body=body, content_type="application/hal+json", times=None)
    result = run_cli_here(["reconcile"], sqlite_url)
    assert result.returncode == ExitCode.TEMPORARY, result.stderr
    assert "Traceback" not in result.stderr and needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_paging_loop_is_amocrms_fault(sqlite_url, fake):
    from tests.conftest import run_cli_here

    _connect(sqlite_url, fake)
    page = {
        "_links": {"next": {"href": f"{fake.base_url}/api/v4/events?page=1"}},
        "_embedded": {"events": [{"id": "a"}]},
    }
    fake.fail("/api/v4/events", status=200, body=page, content_type="application/hal+json", times=None)
    result = run_cli_here(["reconcile"], sqlite_url)
    assert result.returncode == ExitCode.TEMPORARY and "points back to page 1" in result.stderr


def test_a_414_for_one_lead_id_is_amocrms_fault(sqlite_url, fake):
    from tests.conftest import run_cli_here
    from tests.fakes.amocrm import URI_TOO_LONG_HTML

    _connect(sqlite_url, fake)
    pipeline = fake.add_pipeline("Sales", ["New", "Qualified"])
    [new, qualified] = [s["id"] for s in pipeline["_embedded"]["statuses"][:2]]
    lead = fake.add_lead("Acme", pipeline["id"], new, fake.account["current_user_id"])
    fake.move_lead(lead["id"], qualified, pipeline["id"])
    # nginx before amoCRM refuses the lead read's URL as too long, even with one id in it.
    fake.fail("/api/v4/leads", status=414, body=URI_TOO_LONG_HTML, content_type="text/html", times=None, method="GET")
    result = run_cli_here(["reconcile"], sqlite_url)
    assert result.returncode == ExitCode.TEMPORARY, result.stderr
    assert "414" in result.stderr and "one lead id" in result.stderr and "Traceback" not in result.stderr


def _connect(url: str, fake) -> None:
    from amohook.amocrm.oauth import Client, TokenPair
    from amohook.tokens import save_authorization

    store = open_store(url)
    access, refresh = fake.issue_tokens()
    pair = TokenPair(access_token=access, refresh_token=refresh, expires_in=86400, issued_at=time.time())
    client = Client(fake.client_id, fake.client_secret, fake.redirect_uri)
    save_authorization(store, subdomain="example", base_url=fake.base_url, client=client, pair=pair)
    connected_ago(store, 7200)


# -- amoCRM's clock bounds the window --------------------------------------------------------------
@pytest.mark.slow
def test_a_host_clock_20_minutes_fast_still_reads_every_change(store, fake, crm):
    fake.set_clock_behind(1200)  # amoCRM's clock (Date header, event times) 20 minutes behind ours
    [first, second] = new_leads(fake, crm, 2)
    fake.move_lead(first, crm["qualified"], crm["pipeline"], at=time.time() - 1200 - 2)
    one = reconcile(store)
    assert one["queued"] == 1
    amo_now = time.time() - 1200
    assert one["window_to"] <= amo_now + 2
    assert ReconcileState.get(ReconcileState.account == "example").cursor <= amo_now + 2
    time.sleep(3)
    # After the first pass by amoCRM's clock (a second or two ago: the Date header has whole seconds).
    fake.move_lead(second, crm["qualified"], crm["pipeline"], at=time.time() - 1200 - 2)
    two = reconcile(store)
    assert two["queued"] == 1, two
    work(store, crm)
    assert tasks_per_lead(fake) == {first: 1, second: 1}
    doctor = json.loads(run_cli(["doctor", "--json"], store.url).stdout)
    [check] = [c for c in doctor["checks"] if c["name"] == "reconciliation"]
    assert check["severity"] != "error", check


def test_a_cursor_ahead_of_amocrms_clock_is_read_from_amocrms_now_and_doctor_fails(store, fake, crm):
    fake.set_clock_behind(1200)
    [lead] = new_leads(fake, crm, 1)
    # What a pass on a clock 20 minutes fast left behind before passes were bounded by amoCRM's clock.
    with store.write():
        ReconcileState.insert(account="example", cursor=int(time.time()), last_pass_at=time.time()).execute()
    doctor = run_cli(["doctor", "--json"], store.url)
    assert doctor.returncode == ExitCode.UNHEALTHY
    [check] = [c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "reconciliation"]
    assert check["severity"] == "error" and "ahead of amoCRM's clock" in check["detail"]
    assert "--since" in check["fix"]
    fake.move_lead(lead, crm["qualified"], crm["pipeline"], at=time.time() - 1200 - 2)
    summary = reconcile(store)  # never "created_from is after created_to"
    assert summary["queued"] == 1 and summary["window_from"] <= summary["window_to"]


def test_an_empty_window_is_nothing_yet(store, fake, crm):
    """The account was connected moments ago by this host's clock, which is ahead of amoCRM's."""
    from amohook.store.models import Account

    with store.write():
        Account.update(created_at=time.time() + 600, clock_skew=None).execute()  # as if connected "in the future"
    result = run_cli(["reconcile", "--json"], store.url)
    assert result.returncode == 0, result.stderr
    [summary] = json.loads(result.stdout)
    assert summary["read"] == 0 and summary["error"] is None
    assert ReconcileState.get(ReconcileState.account == "example").cursor is None
    assert not fake.requests_to("/api/v4/events")


# -- logs that mean something --------------------------------------------------------------------
def test_recoveries_are_info_in_worker_only_mode_and_a_warning_where_webhooks_were_expected(store, fake, crm, caplog):
    from amohook.recovery.watchdog import remember

    caplog.set_level(logging.INFO, logger="amohook")
    leads = new_leads(fake, crm, 7)
    fake.move_lead(leads[0], crm["qualified"], crm["pipeline"])
    Reconciler(store, 300).run_once()  # worker-only: no listener, no subscription, no webhook ever
    [record] = [r for r in caplog.records if "no webhook brought" in r.getMessage()]
    assert record.levelno == logging.INFO
    # A store that once ran `serve` (a moved quick-start store) now under a worker alone: the
    # webhooks it received days ago do not make every later change a warning.
    deliver(store, fake, "status", [fake.move_lead(leads[3], crm["qualified"], crm["pipeline"])])
    Event.update(received_at=time.time() - 3 * 86400).where(Event.source.is_null()).execute()
    caplog.clear()
    fake.move_lead(leads[4], crm["qualified"], crm["pipeline"])
    Reconciler(store, 300).run_once()
    [record] = [r for r in caplog.records if "no webhook brought" in r.getMessage()]
    assert record.levelno == logging.INFO, record.getMessage()
    # Webhooks arriving for the account while a change came only through the log: that one was lost.
    deliver(store, fake, "status", [fake.move_lead(leads[5], crm["qualified"], crm["pipeline"])])
    caplog.clear()
    fake.move_lead(leads[6], crm["qualified"], crm["pipeline"])
    Reconciler(store, 300).run_once()
    [record] = [r for r in caplog.records if "no webhook brought" in r.getMessage()]
    assert record.levelno == logging.WARNING
    Event.update(received_at=time.time() - 3 * 86400).where(Event.source.is_null()).execute()
    caplog.clear()
    fake.move_lead(leads[1], crm["qualified"], crm["pipeline"])
    Reconciler(store, 300, listening=True).run_once()  # serve: webhooks are expected
    [record] = [r for r in caplog.records if "no webhook brought" in r.getMessage()]
    assert record.levelno == logging.WARNING
    caplog.clear()
    remember(store, "example", "https://hooks.example.com/webhook/x", ["status_lead"])
    fake.move_lead(leads[2], crm["qualified"], crm["pipeline"])
    Reconciler(store, 300).run_once()  # amohook subscribed a destination: expected, even without serve here
    [record] = [r for r in caplog.records if "no webhook brought" in r.getMessage()]
    assert record.levelno == logging.WARNING


@pytest.mark.slow
def test_every_action_carried_out_is_one_info_line_and_nothing_routine_is_louder(store, fake, crm):
    leads = new_leads(fake, crm, 3)
    for lead in leads:
        fake.move_lead(lead, crm["qualified"], crm["pipeline"])
    result = cli(store.url, ["worker", "--rules", crm["rules"], "--once", "--reconcile", "1s"])
    assert result.returncode == 0, result.stderr
    assert len(fake.tasks) == 3
    lines = result.stderr.splitlines()
    done = [line for line in lines if " INFO amohook.actions: " in line and " done, amoCRM id " in line]
    assert len(done) == 3, result.stderr
    for task in fake.tasks.values():
        [line] = [x for x in done if f"lead {task['entity_id']}:" in x]
        assert "create_task" in line and f"amoCRM id {task['id']}" in line and "rule 'call qualified leads'" in line
    louder = [line for line in lines if " WARNING " in line or " ERROR " in line]
    assert not louder, louder
    # Changes since the store was connected are its own: no lookup before the tasks are created.
    assert not fake.requests_to("/api/v4/tasks", "GET")


def test_the_first_look_learns_amocrms_clock_once(store, fake, crm):
    """A store's first look learns amoCRM's clock when no token answer told it: one request, once."""
    reconcile(store)
    fake.clear_requests()
    reconcile(store)
    assert [r.path for r in fake.requests if r.path.startswith("/api/")] == ["/api/v4/events"]


def test_a_pass_with_a_client_that_knows_the_clock_needs_no_probe(store, fake, crm):
    client = client_for(store, "example")
    client.request("GET", "/api/v4/account")
    fake.clear_requests()
    reconcile_account(store, client, "example", watchdog=False)
    assert [r.path for r in fake.requests if r.path.startswith("/api/")] == ["/api/v4/events"]


def test_the_readme_says_what_happens_when_a_store_is_moved_or_wiped():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "### Moving or wiping a store" in readme


def test_an_action_amocrm_refuses_is_one_warning_and_the_rest_one_info_line_each(store, fake, account, caplog):
    from amohook.actions import record_planned
    from tests.helpers.actions import planned, sender

    caplog.set_level(logging.INFO, logger="amohook")
    record_planned(store, [planned(1), planned(2), planned(3, task_type=987654)], event_id=1)
    sender(store).drain()
    mine = [r for r in caplog.records if r.name == "amohook.actions"]
    warnings = [r for r in mine if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "lead 3: create_task rejected" in warnings[0].getMessage()
    infos = [r.getMessage() for r in mine if r.levelno == logging.INFO]
    assert len(infos) == 2 and all(" done, amoCRM id " in m for m in infos)
