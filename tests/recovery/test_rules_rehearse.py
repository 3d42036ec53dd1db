"""`rules test` and `rules explain`: the rules over amoCRM's history, doing nothing; why a lead got no task.

The history lives in the fake amoCRM's events log; `rules test`, `rules explain`, `reconcile` and
the worker run as the real CLI. Every test runs on SQLite, MariaDB and PostgreSQL.
"""

from __future__ import annotations

import json
import time

from amohook.store.models import Action, ChangeSeen, Delivery, Event, ReconcileState
from tests.conftest import run_cli

RULES = """
[[rule]]
name = "call qualified leads"
when = "lead.stage_changed"
pipeline = "Sales"
to_stage = "Qualified"
[rule.create_task]
type = "Call"
text = "Call {lead.name} about the offer"
due = "+1d"

[[rule]]
name = "note a lead that left Qualified"
when = "lead.stage_changed"
pipeline = "Sales"
from_stage = "Qualified"
[rule.add_note]
text = "{lead.name} left Qualified"

[[rule]]
name = "after a call"
when = "task.completed"
task_type = "Call"
[rule.add_note]
text = "called"
"""


def history(fake, crm) -> dict[str, int]:
    """Over the last hour: A into Qualified, out, in again; B in; C in and out; D stays New but changes
    hands; E is created."""
    start = int(time.time()) - 3600
    ids = {}
    for i, name in enumerate("ABCD"):
        ids[name] = fake.add_lead(f"Lead {name}", crm["pipeline"], crm["new"], crm["anna"], lead_id=7001 + i)["id"]
    moves = [
        ("A", crm["qualified"]),
        ("A", crm["new"]),
        ("B", crm["qualified"]),
        ("C", crm["qualified"]),
        ("A", crm["qualified"]),
        ("C", crm["new"]),
    ]
    for n, (name, stage) in enumerate(moves):
        fake.move_lead(ids[name], stage, crm["pipeline"], at=start + 60 * n)
    # Changes no rule here acts on: a lead created in New, D handed to another user.
    fake.create_lead("Lead E", crm["pipeline"], crm["new"], crm["anna"], at=start + 600)
    fake.change_responsible(ids["D"], fake.add_user("Boris", "boris@example.com")["id"], at=start + 660)
    return ids


def rules_file(tmp_path) -> str:
    path = tmp_path / "rehearse.toml"
    path.write_text(RULES)
    return str(path)


def store_rows() -> dict[str, int]:
    return {m.__name__: m.select().count() for m in (Delivery, Event, Action, ChangeSeen, ReconcileState)}


def test_rules_test_gives_exact_counts_writes_nothing_and_a_real_run_then_does_everything(store, fake, crm, tmp_path):
    ids = history(fake, crm)
    rules = rules_file(tmp_path)
    fake.clear_requests()
    before = store_rows()

    result = run_cli(["rules", "test", "--rules", rules, "--since", "2h", "--json"], store.url)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"window", "changes", "rules"}
    assert set(report["window"]) == {"from", "to"} and report["window"]["to"].endswith("Z")
    assert report["changes"] == 8
    by_name = {r["name"]: r for r in report["rules"]}
    calls = by_name["call qualified leads"]
    assert calls["matched"] == 4
    assert sorted(a["lead"] for a in calls["actions"]) == sorted([ids["A"], ids["A"], ids["B"], ids["C"]])
    assert all(set(a) == {"lead", "kind", "summary"} and a["kind"] == "create_task" for a in calls["actions"])
    assert "Call Lead B about the offer" in next(a["summary"] for a in calls["actions"] if a["lead"] == ids["B"])
    left = by_name["note a lead that left Qualified"]
    assert left["matched"] == 2 and sorted(a["lead"] for a in left["actions"]) == sorted([ids["A"], ids["C"]])
    assert by_name["after a call"] == {"name": "after a call", "matched": 0, "actions": []}
    # Reads only, and nothing of amohook's written: the fake saw GETs, the store holds what it held.
    assert fake.requests and {r.method for r in fake.requests} == {"GET"}
    assert store_rows() == before

    # Running the rules for real afterwards still does everything the rehearsal showed.
    assert run_cli(["reconcile", "--since", "2h", "--json"], store.url).returncode == 0
    worker = run_cli(["worker", "--rules", rules, "--once", "--reconcile", "off"], store.url)
    assert worker.returncode == 0, worker.stderr
    tasks = sorted(t["entity_id"] for t in fake.tasks.values())
    assert tasks == sorted(a["lead"] for a in calls["actions"])
    notes = sorted(
        n["entity_id"] for n in fake.notes.values() if n.get("params", {}).get("text", "").endswith("left Qualified")
    )
    assert notes == sorted(a["lead"] for a in left["actions"])


def test_rules_test_costs_a_page_of_the_log_and_a_batched_lead_read(store, fake, crm, tmp_path):
    history(fake, crm)
    fake.clear_requests()

    result = run_cli(["rules", "test", "--rules", rules_file(tmp_path), "--since", "2h"], store.url)

    assert result.returncode == 0, result.stderr
    paths = sorted(r.path for r in fake.requests)
    assert paths == ["/api/v4/events", "/api/v4/leads"]
    out = result.stdout
    assert "8 lead change(s)" in out
    assert "call qualified leads: matched 4 change(s), would plan 4 action(s)" in out
    assert "… and 1 more" in out
    assert "after a call: task.completed — not rehearsed" in out
    assert "judged on the leads as they are now" in out


EXPLAIN_RULES = """
[[rule]]
name = "call qualified leads"
when = "lead.stage_changed"
pipeline = "Sales"
to_stage = "Qualified"
[rule.create_task]
type = "Call"
text = "Call {lead.name}"

[[rule]]
name = "big deals"
when = "lead.stage_changed"
pipeline = "Sales"
to_stage = "Qualified"
[[rule.condition]]
field = "Budget"
equals = "big"
[rule.add_note]
text = "a big one"

[[rule]]
name = "back to New"
when = "lead.stage_changed"
pipeline = "Sales"
to_stage = "New"
[rule.add_note]
text = "back"

[[rule]]
name = "after the call"
when = "task.completed"
task_type = "Call"
[rule.add_note]
text = "called"
"""


def with_budget(store, fake) -> dict:
    """A "Budget" lead field in the fake, synced into the store (the rules' condition names it)."""
    from amohook.amocrm.client import client_for
    from amohook.sync import sync_entities

    budget = fake.add_custom_field("Budget")
    sync_entities(store, client_for(store, "example"))
    return budget


def explain(store, tmp_path, lead: int, *extra: str):
    path = tmp_path / "explain.toml"
    path.write_text(EXPLAIN_RULES)
    return run_cli(["rules", "explain", "--rules", str(path), "--lead", str(lead), *extra], store.url)


def test_explain_names_the_failing_condition_with_the_value_seen_and_what_fired(store, fake, crm, tmp_path):
    from tests.helpers.reconcile import deliver

    budget = with_budget(store, fake)
    lead = fake.add_lead("Acme", crm["pipeline"], crm["new"], crm["anna"], lead_id=7101)
    item = fake.move_lead(lead["id"], crm["qualified"], crm["pipeline"], at=int(time.time()) - 600)
    item["custom_fields"] = [{"id": str(budget["id"]), "name": "Budget", "values": [{"value": "small"}]}]
    deliver(store, fake, "status", [item])
    path = tmp_path / "explain.toml"
    path.write_text(EXPLAIN_RULES)
    worker = run_cli(["worker", "--rules", str(path), "--once", "--reconcile", "off"], store.url)
    assert worker.returncode == 0, worker.stderr
    [task_id] = fake.tasks
    fake.clear_requests()

    result = explain(store, tmp_path, lead["id"], "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    [change] = report["changes"]
    assert change["kind"] == "stage_changed" and "'New' → 'Qualified'" in change["what"]
    assert change["seen"][0].startswith("webhook")
    verdicts = {v["name"]: v for v in change["rules"]}
    assert verdicts["call qualified leads"]["fired"] is True
    assert verdicts["call qualified leads"]["actions"][0]["amocrm_id"] == task_id
    assert verdicts["call qualified leads"]["actions"][0]["status"] == "done"
    assert verdicts["big deals"]["fired"] is False
    assert verdicts["big deals"]["reason"] == "condition failed: 'Budget' equals 'big' — the value seen was 'small'"
    assert verdicts["back to New"]["reason"].startswith("another stage: the lead entered 'Qualified'")
    assert {r.method for r in fake.requests} == {"GET"}

    assert verdicts["after the call"]["reason"] == "the rule is for task.completed; this change is lead.stage_changed"

    # The call is completed: a task hook names the lead as its element; the worker adds the note.
    from tests.helpers.reconcile import deliver_entity

    deliver_entity(store, fake, "task", "update", [fake.complete_task(task_id)])
    worker = run_cli(["worker", "--rules", str(path), "--once", "--reconcile", "off"], store.url)
    assert worker.returncode == 0, worker.stderr
    [note_id] = [n for n, note in fake.notes.items() if note["params"]["text"] == "called"]
    _, completed = json.loads(explain(store, tmp_path, lead["id"], "--json").stdout)["changes"]
    assert completed["kind"] == "task_completed" and completed["what"] == f"task {task_id} completed"
    after = next(v for v in completed["rules"] if v["name"] == "after the call")
    assert after["fired"] is True and after["actions"][0]["amocrm_id"] == note_id

    text = explain(store, tmp_path, lead["id"])
    assert text.returncode == 0, text.stderr
    assert f"fired  call qualified leads: create_task done (amoCRM id {task_id})" in text.stdout
    assert "no     big deals: condition failed: 'Budget' equals 'big' — the value seen was 'small'" in text.stdout


def test_explain_shows_a_change_only_the_events_log_holds_and_one_still_queued(store, fake, crm, tmp_path):
    from tests.helpers.reconcile import deliver

    with_budget(store, fake)
    lead = fake.add_lead("Acme", crm["pipeline"], crm["new"], crm["anna"], lead_id=7102)
    now = int(time.time())
    queued = fake.move_lead(lead["id"], crm["qualified"], crm["pipeline"], at=now - 900)
    deliver(store, fake, "status", [queued])  # received, not yet handled by a worker
    fake.move_lead(lead["id"], crm["new"], crm["pipeline"], at=now - 300)  # its webhook never came

    result = explain(store, tmp_path, lead["id"], "--json")

    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)["changes"]
    assert first["seen"][0].startswith("webhook") and first["seen"][1].startswith("events log")  # one change
    calls = next(v for v in first["rules"] if v["name"] == "call qualified leads")
    assert calls["fired"] is False and calls["reason"].startswith("still pending: the worker has not handled event")
    assert second["seen"] == []
    back = next(v for v in second["rules"] if v["name"] == "back to New")
    assert back["fired"] is False and back["reason"].startswith("amohook never saw this change")
    assert store_rows()["Action"] == 0


def test_rules_test_replays_the_loop_guard_for_a_lead_bouncing_between_stages(store, fake, crm, tmp_path):
    lead = fake.add_lead("Bouncy", crm["pipeline"], crm["new"], crm["anna"], lead_id=7201)
    start = int(time.time()) - 3600
    for n in range(6):  # into Qualified six times within ten minutes
        fake.move_lead(lead["id"], crm["qualified"], crm["pipeline"], at=start + 90 * n)
        fake.move_lead(lead["id"], crm["new"], crm["pipeline"], at=start + 90 * n + 30)
    path = tmp_path / "tag.toml"
    path.write_text(
        '[[rule]]\nname = "tag qualified"\nwhen = "lead.stage_changed"\npipeline = "Sales"\n'
        'to_stage = "Qualified"\n[rule.set_field]\ntag = "hot"\n'
    )

    result = run_cli(["rules", "test", "--rules", str(path), "--since", "2h", "--json"], store.url)

    assert result.returncode == 0, result.stderr
    [rule] = json.loads(result.stdout)["rules"]
    assert rule["matched"] == 6
    summaries = [a["summary"] for a in rule["actions"]]
    assert [s.startswith("skipped (loop guard") for s in summaries] == [False] * 5 + [True]


def test_rules_test_judges_a_condition_on_the_lead_as_it_is_now(store, fake, crm, tmp_path):
    budget = with_budget(store, fake)
    start = int(time.time()) - 3600
    for lead_id, value in ((7301, "big"), (7302, "small")):
        fields = [{"field_id": budget["id"], "field_name": "Budget", "values": [{"value": value}]}]
        fake.add_lead(f"Lead {lead_id}", crm["pipeline"], crm["new"], crm["anna"], lead_id=lead_id)
        fake.leads[lead_id]["custom_fields_values"] = fields
        fake.move_lead(lead_id, crm["qualified"], crm["pipeline"], at=start)
    path = tmp_path / "explain.toml"
    path.write_text(EXPLAIN_RULES)

    result = run_cli(["rules", "test", "--rules", str(path), "--since", "2h", "--json"], store.url)

    assert result.returncode == 0, result.stderr
    by_name = {r["name"]: r for r in json.loads(result.stdout)["rules"]}
    assert by_name["call qualified leads"]["matched"] == 2
    assert by_name["big deals"]["matched"] == 1
    assert [a["lead"] for a in by_name["big deals"]["actions"]] == [7301]
