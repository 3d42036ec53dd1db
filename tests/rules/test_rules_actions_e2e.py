"""The new actions and the task trigger end to end: a webhook stored as the listener stores it,
`worker --rules --once` as cron or a service runs it, the fake amoCRM (and a local receiver for
notify) as the world — on SQLite, MariaDB and PostgreSQL."""

from __future__ import annotations

import json
import time

import pytest

from amohook.amocrm.client import client_for
from amohook.store.models import Action, CustomField
from amohook.sync import sync_entities
from tests.conftest import cli_env, run_cli
from tests.helpers.actions import Receiver
from tests.helpers.reconcile import deliver_entity

CALL_DONE = """
[[rule]]
name = "after the call, send a proposal"
when = "task.completed"
task_type = "Call"
pipeline = "Sales"
stage = "Qualified"
[rule.move_lead]
to_stage = "Proposal"
[rule.set_field]
field = "Source"
value = "Phone"
tag = "called"
"""

PROPOSAL_CHAT = """
[[rule]]
name = "proposals to the sales chat"
when = "lead.stage_changed"
pipeline = "Sales"
to_stage = "Proposal"
[rule.notify]
url_env = "SALES_CHAT_URL"
json = { text = "Proposal: {lead.name} by {rule.name}", lead = { id = "{lead.id}", stage = "{stage.name}" } }
"""

QUALIFIED_TO_PROPOSAL = """
[[rule]]
name = "qualified leads get a proposal"
when = "lead.stage_changed"
pipeline = "Sales"
to_stage = "Qualified"
[rule.move_lead]
to_stage = "Proposal"
"""


@pytest.fixture
def crm(store, fake, account, tmp_path):
    pipeline = fake.add_pipeline("Sales", ["New", "Qualified", "Proposal"])
    stages = {s["name"]: s["id"] for s in pipeline["_embedded"]["statuses"]}
    call = fake.add_task_type("Call")
    meeting = fake.add_task_type("Meeting")
    anna = fake.add_user("Anna", "anna@example.com")
    source = fake.add_custom_field("Source", "select", enums=["Phone", "Website"])
    sync_entities(store, client_for(store, "example"))
    fake.clear_requests()
    return dict(
        pipeline=pipeline["id"],
        call=call["id"],
        meeting=meeting["id"],
        anna=anna["id"],
        source=source["id"],
        dir=tmp_path,
        **stages,
    )


def rules_file(crm, text: str) -> str:
    path = crm["dir"] / "rules.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def work(store, rules: str, **env: str):
    result = run_cli(
        ["worker", "--rules", rules, "--once", "--reconcile", "off"], store.url, env=cli_env(store.url, **env)
    )
    assert result.returncode == 0, result.stderr
    return result


def lead_with_task(fake, crm, stage: str, task_type: str = "call", lead_id: int = 7001) -> tuple[int, int]:
    fake.add_lead("Acme", crm["pipeline"], crm[stage], crm["anna"], lead_id=lead_id)
    task_id = 4800000 + lead_id
    now = int(time.time())
    fake.tasks[task_id] = {
        "id": task_id,
        "entity_id": lead_id,
        "entity_type": "leads",
        "task_type_id": crm[task_type],
        "text": "Call Acme",
        "complete_till": now + 3600,
        "is_completed": False,
        "responsible_user_id": crm["anna"],
        "created_by": crm["anna"],
        "created_at": now,
        "updated_at": now,
    }
    return lead_id, task_id


def test_a_completed_call_moves_the_lead_and_sets_its_source_once(store, fake, crm):
    rules = rules_file(crm, CALL_DONE)
    lead, task = lead_with_task(fake, crm, "Qualified")
    fake.leads[lead]["_embedded"]["tags"] = [{"id": 3, "name": "vip", "color": None}]
    item = fake.complete_task(task, result="Agreed")
    deliver_entity(store, fake, "task", "update", [item])
    work(store, rules)
    assert fake.leads[lead]["status_id"] == crm["Proposal"]
    assert {t["name"] for t in fake.leads[lead]["_embedded"]["tags"]} == {"vip", "called"}
    [cf] = fake.leads[lead]["custom_fields_values"]
    assert (cf["field_id"], cf["values"]) == (crm["source"], [{"value": "Phone"}])
    assert sorted((a.kind, a.status) for a in Action.select()) == [("move_lead", "done"), ("set_field", "done")]
    assert len(fake.requests_to(f"/api/v4/leads/{lead}", "GET")) == 1  # where the lead was: read once
    # amoCRM's retry of the hook, and the second update completing from the task list sends (the
    # result, without action_close): nothing more happens.
    deliver_entity(store, fake, "task", "update", [item])
    deliver_entity(
        store, fake, "task", "update", [{**item, "action_close": "0", "last_modified": str(int(time.time()) + 1)}]
    )
    work(store, rules)
    assert Action.select().count() == 2
    assert len(fake.requests_to("/api/v4/leads", "PATCH")) == 2


def test_a_task_of_another_type_or_on_a_lead_elsewhere_does_nothing(store, fake, crm):
    rules = rules_file(crm, CALL_DONE)
    _, meeting = lead_with_task(fake, crm, "Qualified", task_type="meeting", lead_id=7001)
    new_lead, call = lead_with_task(fake, crm, "New", lead_id=7002)
    deliver_entity(store, fake, "task", "update", [fake.complete_task(meeting), fake.complete_task(call)])
    work(store, rules)
    assert Action.select().count() == 0
    assert fake.leads[new_lead]["status_id"] == crm["New"]
    assert not fake.requests_to("/api/v4/leads", "PATCH")
    assert len(fake.requests_to("/api/v4/leads/", "GET")) == 1  # only the call's lead was read


def test_a_rule_made_move_comes_back_and_feeds_the_next_rule_once(store, fake, crm):
    receiver = Receiver()
    try:
        rules = rules_file(crm, CALL_DONE + PROPOSAL_CHAT)
        lead, task = lead_with_task(fake, crm, "Qualified")
        deliver_entity(store, fake, "task", "update", [fake.complete_task(task)])
        work(store, rules, SALES_CHAT_URL=receiver.url)
        [(action, moved)] = [h for h in fake.patched_hooks if h[0] == "status"]
        deliver_entity(store, fake, "leads", action, [moved])  # amoCRM tells amohook of its own move
        deliver_entity(store, fake, "leads", action, [moved])  # twice
        result = work(store, rules, SALES_CHAT_URL=receiver.url)
        assert "s3cr3t" not in result.stdout + result.stderr
    finally:
        receiver.close()
    assert [m for _, m in receiver.messages] == [
        {"text": "Proposal: Acme by proposals to the sales chat", "lead": {"id": str(lead), "stage": "Proposal"}}
    ]
    assert Action.get(Action.kind == "notify").status == "done"
    assert len(fake.requests_to("/api/v4/leads", "PATCH")) == 2  # the move and the field: no more


def test_a_chain_of_rule_made_moves_of_one_lead_stops_and_says_so(store, fake, crm):
    rules = rules_file(crm, QUALIFIED_TO_PROPOSAL)
    fake.add_lead("Acme", crm["pipeline"], crm["New"], crm["anna"], lead_id=7001)
    start = int(time.time()) - 300
    for i in range(6):  # someone (or another integration) keeps moving it back to Qualified
        deliver_entity(
            store, fake, "leads", "status", [fake.move_lead(7001, crm["Qualified"], crm["pipeline"], at=start + i)]
        )
        result = work(store, rules)
    moves = list(Action.select().order_by(Action.id))
    assert [a.status for a in moves] == ["done"] * 5 + ["skipped"]
    assert "loop guard" in moves[-1].last_error
    assert "loop guard" in result.stderr
    assert fake.leads[7001]["status_id"] == crm["Qualified"]  # the sixth move was not made
    assert len(fake.requests_to("/api/v4/leads", "PATCH")) == 5


@pytest.mark.parametrize(
    "text, env, needle",
    [
        (
            QUALIFIED_TO_PROPOSAL
            + QUALIFIED_TO_PROPOSAL.replace("qualified leads get", "proposals go back")
            .replace('to_stage = "Qualified"', 'to_stage = "X"')
            .replace('to_stage = "Proposal"', 'to_stage = "Qualified"')
            .replace('to_stage = "X"', 'to_stage = "Proposal"'),
            {},
            "move leads in a circle",
        ),
        (
            QUALIFIED_TO_PROPOSAL.replace('to_stage = "Proposal"', 'to_stage = "Qualified"'),
            {},
            "moves the lead to the stage that triggers it",
        ),
        (PROPOSAL_CHAT, {"SALES_CHAT_URL": "http://chat.example.com/hook/s3cr3t"}, "must be https"),
        (PROPOSAL_CHAT, {}, "SALES_CHAT_URL is not set"),
        (PROPOSAL_CHAT.replace('url_env = "SALES_CHAT_URL"', 'url = "https://x"'), {}, "does not belong in the file"),
        (CALL_DONE.replace('field = "Source"', 'field = "Sourse"'), {}, "did you mean 'Source'"),
        (CALL_DONE.replace('task_type = "Call"', 'task_type = "Cal"'), {}, "task_type"),
        (CALL_DONE.replace('stage = "Qualified"', 'to_stage = "Qualified"'), {}, "write stage ="),
        (
            CALL_DONE.replace('field = "Source"\nvalue = "Phone"', 'field = "Budget"\nvalue = "lots"'),
            {},
            "write a number",
        ),
    ],
)
def test_rules_check_refuses_what_would_go_wrong(store, fake, crm, text, env, needle):
    fake.add_custom_field("Budget", "numeric")
    sync_entities(store, client_for(store, "example"))
    result = run_cli(["rules", "check", "--rules", rules_file(crm, text)], store.url, env=cli_env(store.url, **env))
    assert result.returncode != 0
    assert needle in result.stderr, result.stderr
    assert "s3cr3t" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "value, hint",
    [
        ("Phon", "the closest is 'Phone'"),
        ("website", "the closest is 'Website'"),
        ("Сайт", "they are 'Phone', 'Website'"),  # nothing alike: the options are named
    ],
)
def test_rules_check_refuses_a_value_outside_a_select_fields_options(store, fake, crm, value, hint):
    """amoCRM refuses it with NotSupportedChoice when the change is sent (docs/amocrm.md §10.4)."""
    text = CALL_DONE.replace('value = "Phone"', f'value = "{value}"')
    result = run_cli(["rules", "check", "--rules", rules_file(crm, text)], store.url)
    assert result.returncode == 2, result.stderr
    assert "field 'Source' (select)" in result.stderr
    assert f"'{value}' is not one of its 2 options — {hint}" in result.stderr


def test_rules_check_takes_an_option_and_leaves_unsynced_options_to_amocrm(store, fake, crm):
    assert run_cli(["rules", "check", "--rules", rules_file(crm, CALL_DONE)], store.url).returncode == 0
    with store.write():
        CustomField.update(enums=None).execute()  # a store upgraded to version 6, not synced since
    text = CALL_DONE.replace('value = "Phone"', 'value = "Fax"')
    assert run_cli(["rules", "check", "--rules", rules_file(crm, text)], store.url).returncode == 0


def test_rules_check_shows_what_each_rule_does(store, fake, crm):
    result = run_cli(
        ["rules", "check", "--rules", rules_file(crm, CALL_DONE + PROPOSAL_CHAT), "--json"],
        store.url,
        env=cli_env(store.url, SALES_CHAT_URL="https://chat.example.com/hook/s3cr3t"),
    )
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)
    assert first["actions"] == ["move_lead", "set_field"] and first["move_to"] == [crm["pipeline"], crm["Proposal"]]
    assert first["trigger_task_type_id"] == crm["call"] and first["stage_id"] == crm["Qualified"]
    assert second["notify_url_env"] == "SALES_CHAT_URL" and "s3cr3t" not in result.stdout
