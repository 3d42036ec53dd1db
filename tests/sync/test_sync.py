"""sync-entities: the store follows amoCRM (added, changed, removed), one transaction per kind, on
every backend; and the CLI around it."""

from __future__ import annotations

import json

import pytest

from amohook.amocrm.client import client_for
from amohook.errors import AccountBlocked, AmoApiError, AmoTemporaryError, ExitCode, LockBusy
from amohook.store.lease import try_acquire
from amohook.store.models import Account, CustomField, Pipeline, Stage, TaskType, User
from amohook.sync import NOT_TRIED, USERS_NOT_ADMIN, sync_entities
from tests.conftest import cli_env, run_cli


@pytest.fixture(autouse=True)
def _fake_had_no_bugs(fake):
    yield
    assert not fake.errors, fake.errors


@pytest.fixture
def client(store, account):
    # The store-shared limiter, as in production; sleeps are real but only the limiter waits here.
    return client_for(store, "example", sleep=lambda s: None)


@pytest.fixture
def amo(fake):
    """The fake account, grown: two pipelines, three task types, 300 users (two pages), three fields."""
    fake.add_pipeline("Sales", ["Qualified", "Proposal"])
    fake.add_task_type("Call", code=None)
    for i in range(298):
        fake.add_user(f"User {i:03}", f"user{i:03}@example.com")
    fake.add_custom_field("Budget", "numeric")
    fake.add_custom_field("Source", "select")
    return fake


def snapshot(model, account="example"):
    fields = [f for f in model._meta.sorted_field_names if f != "id"]
    return sorted(tuple(getattr(row, f) for f in fields) for row in model.select().where(model.account == account))


def counts(report):
    return {r.kind: (r.added, r.changed, r.removed, r.unchanged) for r in report.results}


def set_token(fake, store, admin: bool):
    access, refresh = fake.issue_tokens(admin=admin)
    with store.write():
        Account.update(access_token=access, refresh_token=refresh).where(Account.subdomain == "example").execute()


# -- filling, updating, removing ---------------------------------------------------------------
def test_first_sync_fills_every_kind_with_the_fewest_requests(store, client, amo):
    report = sync_entities(store, client)
    assert report.ok and report.rate_limited == 0
    assert counts(report) == {
        "pipelines": (2, 0, 0, 0),
        "stages": (5 + 5, 0, 0, 0),
        "task_types": (3, 0, 0, 0),
        "users": (300, 0, 0, 0),
        "custom_fields": (3, 0, 0, 0),
    }
    # pipelines 1 + account 1 + users 2 pages + custom fields 1
    assert report.requests == 5 == len(amo.requests)
    assert all(r.query.get("limit") == ["250"] for r in amo.requests if r.path != "/api/v4/account")
    # 142 and 143 exist in every pipeline: one row per (pipeline, status)
    assert Stage.select().where(Stage.amo_id == 142).count() == 2
    sales = Pipeline.get(Pipeline.name == "Sales")
    assert [s.name for s in Stage.select().where(Stage.pipeline_id == sales.amo_id).order_by(Stage.sort)] == [
        "Неразобранное",
        "Qualified",
        "Proposal",
        "Успешно реализовано",
        "Закрыто и не реализовано",
    ]
    admin = User.get(User.email == "admin@example.com")
    assert admin.is_admin and admin.is_active
    assert TaskType.get(TaskType.amo_id == 2).code == "MEETING"
    assert CustomField.get(CustomField.name == "Budget").type == "numeric"
    assert Account.get(Account.subdomain == "example").timezone == "Europe/Moscow"


def test_a_second_sync_without_changes_writes_nothing(store, client, amo):
    sync_entities(store, client)
    before = {m: snapshot(m) for m in (Pipeline, Stage, TaskType, User, CustomField)}
    report = sync_entities(store, client)
    assert {k: c[:3] for k, c in counts(report).items()} == {k: (0, 0, 0) for k in counts(report)}
    assert report.result("users").unchanged == 300
    assert {m: snapshot(m) for m in before} == before


def test_changes_are_applied_and_vanished_entities_removed(store, client, amo):
    sync_entities(store, client)
    sales = next(p for p in amo.pipelines if p["name"] == "Sales")
    sales["name"] = "Sales 2025"
    sales["_embedded"]["statuses"][1]["name"] = "Qualified lead"
    del sales["_embedded"]["statuses"][2]  # "Proposal" deleted
    amo.pipelines.remove(next(p for p in amo.pipelines if p["name"] == "Воронка"))
    amo.task_types[0]["name"] = "Звонок"
    amo.users[5]["email"] = "new@example.com"
    amo.users[6]["rights"]["is_active"] = False
    del amo.users[7:10]
    amo.custom_fields.pop()

    report = sync_entities(store, client)
    assert counts(report) == {
        "pipelines": (0, 1, 1, 0),
        "stages": (0, 1, 1 + 5, 3),
        "task_types": (0, 1, 0, 2),
        "users": (0, 2, 3, 295),
        "custom_fields": (0, 0, 1, 2),
    }
    assert [p.name for p in Pipeline.select()] == ["Sales 2025"]
    assert Stage.select().where(Stage.pipeline_id == 3177727).count() == 0
    assert Stage.get(Stage.pipeline_id == sales["id"], Stage.sort == 20).name == "Qualified lead"
    assert TaskType.get(TaskType.amo_id == 1).name == "Звонок"
    assert User.select().count() == 297 and not User.get(User.amo_id == amo.users[6]["id"]).is_active
    assert CustomField.select().where(CustomField.name == "Source").count() == 0


def test_the_options_of_select_fields_are_stored_and_follow_amocrm(store, client, amo):
    """`rules check` compares a set_field value with them (GET /api/v4/leads/custom_fields: `enums`)."""
    field = amo.add_custom_field("Lost because", "select", enums=["Price", "Timing", "Цена"])
    sync_entities(store, client)
    stored = CustomField.get(CustomField.amo_id == field["id"])
    assert json.loads(stored.enums) == [{"id": e["id"], "value": e["value"]} for e in field["enums"]]
    assert CustomField.get(CustomField.name == "Budget").enums is None  # amoCRM sends null
    field["enums"][1]["value"] = "Too early"
    field["enums"].append({"id": 1, "value": "Other", "sort": 9})
    assert counts(sync_entities(store, client))["custom_fields"] == (0, 1, 0, 3)
    values = [o["value"] for o in json.loads(CustomField.get(CustomField.amo_id == field["id"]).enums)]
    assert values == ["Price", "Too early", "Цена", "Other"]


@pytest.mark.parametrize("enums", [[{"id": 1}], ["Price"], {"1": "Price"}, [{"id": 1, "value": 5}]])
def test_options_not_as_documented_are_not_stored(store, client, amo, enums):
    field = amo.add_custom_field("Odd", "select")
    field["enums"] = enums
    assert sync_entities(store, client).ok
    assert CustomField.get(CustomField.amo_id == field["id"]).enums is None


def test_accounts_do_not_see_each_others_rows(store, client, amo):
    with store.write():
        Pipeline.create(account="other", amo_id=1, name="Theirs")
    sync_entities(store, client)
    assert [p.name for p in Pipeline.select().where(Pipeline.account == "other")] == ["Theirs"]


def test_overlong_names_are_cut_to_the_column_not_refused(store, client, amo):
    amo.add_user("Я" * 400, "long@example.com")
    assert sync_entities(store, client).ok
    assert User.get(User.email == "long@example.com").name == "Я" * 255


def test_unusual_names_round_trip_so_a_second_sync_sees_no_change(store, client, amo):
    amo.add_user("Ольга 🚀 O'Neil  ", "Olga@Example.COM")
    amo.add_task_type("Звонок\tклиенту", code="call_back")
    amo.pipelines[0]["_embedded"]["statuses"][1]["name"] = "Sales"  # a stage named like a pipeline
    amo.pipelines[0]["_embedded"]["statuses"][2]["name"] = "sales"  # and one differing only in case
    sync_entities(store, client)
    again = sync_entities(store, client)
    assert all(r.added == r.changed == r.removed == 0 for r in again.results), counts(again)
    assert User.get(User.email == "Olga@Example.COM").name == "Ольга 🚀 O'Neil  "


# -- partial failures --------------------------------------------------------------------------
def test_users_without_admin_rights_are_skipped_and_the_rest_is_synced(store, client, amo):
    sync_entities(store, client)
    users = snapshot(User)
    set_token(amo, store, admin=False)
    amo.add_custom_field("Added later")
    report = sync_entities(store, client)
    assert report.ok
    assert report.result("users").status == "skipped" and report.result("users").skipped == USERS_NOT_ADMIN
    assert report.result("custom_fields").added == 1
    assert snapshot(User) == users  # kept, not removed


def test_a_failure_halfway_through_the_users_keeps_the_old_users(store, account, amo):
    client = client_for(store, "example", sleep=lambda s: None, max_attempts=3)
    sync_entities(store, client)
    users = snapshot(User)
    del amo.users[0:50]  # would be removed, if the sync got to write
    amo.add_user("Newcomer")
    amo.add_custom_field("Added later")

    def break_page_two(event):
        if event.kind == "users" and event.phase == "fetch" and event.fetched == 250:
            amo.fail("/api/v4/users", status=500, times=None)  # every try at page 2 fails

    report = sync_entities(store, client, on_progress=break_page_two)
    amo.clear_faults()
    failed = report.result("users")
    assert failed.status == "failed" and isinstance(failed.error, AmoTemporaryError)
    assert [r.query.get("page", ["1"])[0] for r in amo.requests_to("/api/v4/users")][-4:] == ["1", "2", "2", "2"]
    assert snapshot(User) == users
    # a 5xx of one endpoint does not stop the other kinds
    assert report.result("custom_fields").added == 1
    with pytest.raises(AmoTemporaryError):
        report.raise_for_error()


def test_an_answer_without_ids_fails_that_kind_and_keeps_its_rows(store, client, amo):
    sync_entities(store, client)
    fields = snapshot(CustomField)
    amo.fail(
        "/api/v4/leads/custom_fields",
        status=200,
        content_type="application/hal+json",
        body={"_links": {}, "_embedded": {"custom_fields": [{"name": "no id"}]}},
    )
    report = sync_entities(store, client)
    assert isinstance(report.result("custom_fields").error, AmoApiError)
    assert "without a numeric id" in report.result("custom_fields").error.message
    assert snapshot(CustomField) == fields


def test_a_blocked_account_stops_the_sync_at_the_first_request(store, client, amo):
    amo.block()
    report = sync_entities(store, client)
    assert isinstance(report.error, AccountBlocked)
    assert [r.status for r in report.results] == ["failed", "failed", "skipped", "skipped", "skipped"]
    assert report.result("users").skipped == NOT_TRIED
    assert len(amo.requests) == 1 and Pipeline.select().count() == 0


def test_a_second_sync_of_the_same_account_is_refused_while_one_runs(store, client, amo):
    assert try_acquire("sync:example", "someone else", ttl=60)
    with pytest.raises(LockBusy):
        sync_entities(store, client)
    assert amo.requests == []


def test_progress_reports_every_kind_from_fetch_to_done(store, client, amo):
    events = []
    sync_entities(store, client, on_progress=events.append)
    finals = [(e.kind, e.phase) for e in events if e.phase not in ("fetch", "write")]
    assert finals == [("pipelines", "done"), ("task_types", "done"), ("users", "done"), ("custom_fields", "done")]
    assert max(e.fetched for e in events if e.kind == "users") == 300


# -- the CLI -----------------------------------------------------------------------------------
def test_cli_sync_then_listings_show_the_store(store, account, amo):
    result = run_cli(["sync-entities"], store.url)
    assert result.returncode == 0, result.stderr
    assert "sync-entities: example" in result.stdout and "5 requests" in result.stdout
    assert result.stderr == ""  # no terminal: no progress display

    pipes = json.loads(run_cli(["pipelines", "--json"], store.url).stdout)
    assert [p["name"] for p in pipes] == ["Воронка", "Sales"]
    assert all({"id", "name"} <= s.keys() for p in pipes for s in p["statuses"])
    assert [(s["id"], s["name"]) for s in pipes[1]["statuses"]][1:4] == [
        (pipes[1]["statuses"][1]["id"], "Qualified"),
        (pipes[1]["statuses"][2]["id"], "Proposal"),
        (142, "Успешно реализовано"),
    ]
    assert [s["id"] for s in pipes[0]["statuses"]][-2:] == [142, 143]

    types = json.loads(run_cli(["task-types", "--json"], store.url).stdout)
    assert [(t["id"], t["name"], t["code"]) for t in types][:2] == [
        (1, "Связаться", "FOLLOW_UP"),
        (2, "Встреча", "MEETING"),
    ]
    users = json.loads(run_cli(["users", "--json"], store.url).stdout)
    assert len(users) == 300 and {"id", "name", "email", "is_admin", "is_active"} == users[0].keys()

    table = run_cli(["pipelines"], store.url)
    assert table.returncode == 0 and "Qualified" in table.stdout and "Sales" in table.stdout
    assert "Встреча" in run_cli(["task-types"], store.url).stdout
    assert "admin@example.com" in run_cli(["users"], store.url).stdout


def test_cli_sync_json_is_a_list_of_account_reports(store, account, amo):
    result = run_cli(["sync-entities", "--json"], store.url)
    assert result.returncode == 0 and result.stderr == ""
    (report,) = json.loads(result.stdout)
    assert report["account"] == "example" and report["ok"] and report["requests"] == 5
    assert {k["kind"]: k["added"] for k in report["kinds"]} == {
        "pipelines": 2,
        "stages": 10,
        "task_types": 3,
        "users": 300,
        "custom_fields": 3,
    }


def test_cli_quiet_prints_nothing_even_on_a_terminal(store, account, amo):
    result = run_cli(["sync-entities", "--quiet"], store.url, env=cli_env(store.url, TTY_COMPATIBLE="1"))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_cli_shows_progress_on_a_terminal(store, account, amo):
    result = run_cli(["sync-entities"], store.url, env=cli_env(store.url, TTY_COMPATIBLE="1"))
    assert result.returncode == 0 and "example: users" in result.stderr


def test_cli_without_admin_rights_warns_that_users_were_skipped(store, account, amo):
    set_token(amo, store, admin=False)
    result = run_cli(["sync-entities"], store.url)
    assert result.returncode == 0
    assert "users skipped: the token's user is not an admin" in result.stderr


def test_cli_blocked_account_exits_5_with_the_reason(store, account, amo):
    amo.block()
    result = run_cli(["sync-entities", "--quiet"], store.url)
    assert result.returncode == ExitCode.BLOCKED
    assert result.stderr.startswith("error: amoCRM blocked API access for 'example'")
    assert len(amo.requests) == 1


@pytest.mark.slow
def test_cli_failed_kind_exits_temporary_after_the_summary(store, account, amo):
    amo.fail("/api/v4/leads/custom_fields", status=502, times=None)
    result = run_cli(["sync-entities"], store.url)
    assert result.returncode == ExitCode.TEMPORARY
    assert "not updated (lead custom fields): the rows stored before are kept" in result.stdout
    assert result.stderr == "error: amoCRM answered 502 to GET /api/v4/leads/custom_fields: Bad Gateway\n"
    assert User.select().count() == 300  # the other kinds were written


def test_cli_listings_before_any_sync_say_what_to_run(store, account):
    result = run_cli(["pipelines"], store.url)
    assert result.returncode == 0 and "run `amohook sync-entities --subdomain example`" in result.stderr
    assert json.loads(run_cli(["users", "--json"], store.url).stdout) == []


def test_cli_unknown_account_is_a_usage_error(store, account):
    result = run_cli(["pipelines", "--subdomain", "nope"], store.url)
    assert result.returncode == ExitCode.USAGE and "init-auth" in result.stderr
