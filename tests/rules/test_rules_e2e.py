"""Rules end to end: a webhook in, one task out — through the real `serve`, `worker` and CLI,
against the fake amoCRM, on every backend."""

from __future__ import annotations

import subprocess
import sys
import time
from urllib.parse import urlencode

import pytest

from amohook.amocrm.client import client_for
from amohook.errors import ExitCode
from amohook.store import open_store
from amohook.store.models import Action, Event
from amohook.sync import sync_entities
from tests.conftest import ROOT, cli_env, run_cli
from tests.helpers.e2e import RULES, SECRET, Serve, settle, stage_body


@pytest.mark.slow
def test_the_readme_example_end_to_end(store, fake, crm):
    serve = Serve(store.url, "--workers", "1", "--rules", crm["rules"])
    try:
        before = time.time()
        assert serve.post(stage_body(crm)) == 200
        settle(fake, 1)
    finally:
        serve.stop()
    [task] = fake.tasks.values()
    assert task["text"] == "Call Acme about the offer"
    assert task["task_type_id"] == crm["call"]
    assert task["responsible_user_id"] == crm["anna"]
    assert (task["entity_type"], task["entity_id"]) == ("leads", 5001)
    assert before + 86400 - 5 <= task["complete_till"] <= time.time() + 86400
    action = Action.get()
    assert action.status == "done" and action.result_id == task["id"]
    import json

    shown = json.loads(run_cli(["events", "show", str(Event.get().id), "--json"], store.url).stdout)
    assert shown["actions"] == [
        {
            "rule": "call qualified leads",
            "kind": "create_task",
            "status": "done",
            "task_id": task["id"],
            "attempts": 0,
            "last_error": None,
        }
    ]


@pytest.mark.slow
def test_duplicates_resends_and_replays_create_one_task(store, fake, crm):
    serve = Serve(store.url, "--workers", "1", "--rules", crm["rules"])
    try:
        assert serve.post(stage_body(crm, block="status")) == 200
        assert serve.post(stage_body(crm, block="update")) == 200  # the same change, second subscription
        assert serve.post(stage_body(crm, block="status")) == 200  # amoCRM's retry of the first
        settle(fake, 1)
        ids = [str(e.id) for e in Event.select()]
        assert len(ids) == 2  # the retry added no event
        replay = run_cli(["events", "replay", *ids], store.url)
        assert replay.returncode == 0, replay.stderr
        settle(fake, 1)
    finally:
        serve.stop()
    assert len(fake.tasks) == 1
    assert len(fake.requests_to("/api/v4/tasks", "POST")) == 1
    assert Action.select().count() == 1


@pytest.mark.slow
def test_a_later_move_into_the_same_stage_is_a_new_task(store, fake, crm):
    serve = Serve(store.url, "--workers", "1", "--rules", crm["rules"])
    try:
        assert serve.post(stage_body(crm, stamp=1_750_000_000)) == 200
        assert serve.post(stage_body(crm, stamp=1_750_090_000)) == 200
        settle(fake, 2)
    finally:
        serve.stop()
    assert len(fake.tasks) == 2


@pytest.mark.slow
def test_stored_events_are_processed_by_a_separate_worker_in_batches(store, fake, crm):
    serve = Serve(store.url, "--workers", "0")
    try:
        fields = {"account[subdomain]": "example"}
        for i in range(120):
            p = f"leads[update][{i}]"
            fields.update(
                {
                    f"{p}[id]": str(7000 + i),
                    f"{p}[name]": f"Lead {i}",
                    f"{p}[status_id]": str(crm["qualified"]),
                    f"{p}[old_status_id]": str(crm["new"]),
                    f"{p}[pipeline_id]": str(crm["pipeline"]),
                    f"{p}[responsible_user_id]": str(crm["anna"]),
                    f"{p}[last_modified]": "1750000000",
                }
            )
        assert serve.post(urlencode(fields).encode()) == 200
    finally:
        serve.stop()
    assert Event.select().where(Event.status == "pending").count() == 120
    result = run_cli(["worker", "--rules", crm["rules"], "--once", "--log-level", "warning"], store.url, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "processed 120 event(s)" in result.stdout
    assert len(fake.tasks) == 120
    assert [len(r.json) for r in fake.requests_to("/api/v4/tasks", "POST")] == [50, 50, 20]
    assert len({t["entity_id"] for t in fake.tasks.values()}) == 120


@pytest.mark.slow
def test_digital_pipeline_hook_with_only_ids_fetches_the_lead(sqlite_url, tmp_path):
    from tests.fakes.amocrm import FakeAmo

    with FakeAmo() as fake:
        store = open_store(sqlite_url)
        from amohook.amocrm.oauth import Client, TokenPair
        from amohook.tokens import save_authorization

        access, refresh = fake.issue_tokens()
        save_authorization(
            store,
            subdomain="example",
            base_url=fake.base_url,
            client=Client(fake.client_id, fake.client_secret, fake.redirect_uri),
            pair=TokenPair(access, refresh, 86400, time.time()),
        )
        pipeline = fake.add_pipeline("Sales", ["New", "Qualified"])
        stages = {s["name"]: s["id"] for s in pipeline["_embedded"]["statuses"]}
        fake.add_task_type("Call")
        bob = fake.add_user("Bob", "bob@example.com")
        fake.add_lead("Globex", pipeline["id"], stages["Qualified"], bob["id"], lead_id=6001)
        sync_entities(store, client_for(store, "example"))
        rules = tmp_path / "rules.toml"
        rules.write_text(RULES)
        body = urlencode(
            {
                "leads[status][0][id]": "6001",
                "leads[status][0][status_id]": str(stages["Qualified"]),
                "leads[status][0][pipeline_id]": str(pipeline["id"]),
                "leads[status][0][old_status_id]": str(stages["New"]),
                "leads[status][0][old_pipeline_id]": str(pipeline["id"]),
                "account[id]": "1231414",
                "account[subdomain]": "example",
            }
        ).encode()
        serve = Serve(sqlite_url, "--workers", "1", "--rules", str(rules))
        try:
            assert serve.post(body) == 200
            settle(fake, 1)
        finally:
            serve.stop()
        [task] = fake.tasks.values()
        assert task["responsible_user_id"] == bob["id"]
        assert task["text"] == "Call Globex about the offer"
        assert fake.requests_to("/api/v4/leads/6001")


def test_rules_check_names_the_rule_and_suggests(store, crm, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(RULES.replace('"Qualified"', '"Qualifed"').replace('"Call"', '"Cal"'))
    result = run_cli(["rules", "check", "--rules", str(bad)], store.url)
    assert result.returncode == ExitCode.USAGE
    assert "rule 'call qualified leads'" in result.stderr
    assert "no stage 'Qualifed' in pipeline 'Sales' — did you mean 'Qualified'?" in result.stderr
    assert "Traceback" not in result.stderr
    good = run_cli(["rules", "check", "--rules", crm["rules"]], store.url)
    assert good.returncode == 0, good.stderr
    assert "1 rule valid" in good.stdout


def test_unknown_task_type_and_user_are_reported_with_suggestions(sqlite_url, fake, tmp_path):
    store = open_store(sqlite_url)
    from amohook.amocrm.oauth import Client, TokenPair
    from amohook.tokens import save_authorization

    access, refresh = fake.issue_tokens()
    save_authorization(
        store,
        subdomain="example",
        base_url=fake.base_url,
        client=Client(fake.client_id, fake.client_secret, fake.redirect_uri),
        pair=TokenPair(access, refresh, 86400, time.time()),
    )
    fake.add_pipeline("Sales", ["New", "Qualified"])
    fake.add_task_type("Call")
    fake.add_user("Anna Karenina", "anna@example.com")
    sync_entities(store, client_for(store, "example"))
    rules = tmp_path / "r.toml"
    rules.write_text(RULES.replace('"Call"', '"Calll"').replace('responsible = "lead"', 'responsible = "Anna Karenna"'))
    result = run_cli(["rules", "check", "--rules", str(rules)], sqlite_url)
    assert result.returncode == ExitCode.USAGE
    assert "did you mean 'Call'" in result.stderr
    assert "did you mean 'Anna Karenina'" in result.stderr


@pytest.mark.slow
def test_serve_and_worker_refuse_to_start_with_invalid_rules(store, crm, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(RULES.replace("{lead.name}", "{lead.nmae}"))
    env = cli_env(store.url, AMOHOOK_WEBHOOK_SECRET=SECRET)
    served = subprocess.run(
        [sys.executable, "-m", "amohook", "serve", "--port", "0", "--rules", str(bad)],
        env=env,
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert served.returncode == ExitCode.USAGE
    assert "unknown placeholder {lead.nmae}" in served.stderr and "listening" not in served.stdout
    worked = run_cli(["worker", "--rules", str(bad), "--once"], store.url)
    assert worked.returncode == ExitCode.USAGE
    missing = run_cli(["worker", "--rules", str(tmp_path / "nope.toml"), "--once"], store.url)
    assert missing.returncode == ExitCode.USAGE and "cannot read the rules file" in missing.stderr


@pytest.mark.slow
def test_a_task_and_a_note_each_once(store, fake, crm, tmp_path):
    rules = tmp_path / "with-note.toml"
    rules.write_text(RULES + '[rule.add_note]\ntext = "Qualified by the rules; task for {responsible.name}"\n')
    serve = Serve(store.url, "--workers", "1", "--rules", str(rules))
    try:
        assert serve.post(stage_body(crm, block="status")) == 200
        assert serve.post(stage_body(crm, block="update")) == 200
        settle(fake, 1)
        deadline = time.time() + 10
        while not fake.notes and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        serve.stop()
    assert len(fake.tasks) == 1
    [note] = fake.notes.values()
    assert (note["entity_id"], note["note_type"]) == (5001, "common")
    assert note["params"]["text"] == "Qualified by the rules; task for Anna"
