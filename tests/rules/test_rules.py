"""Rules, pure parts: the file, templates, due dates, recognising lead changes, matching, keys."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from amohook.actions import kinds
from amohook.actions.base import action_key
from amohook.actions.task import CompiledTask
from amohook.rules import (
    CompiledRule,
    PlanContext,
    RulesError,
    check_template,
    due_timestamp,
    lead_changes,
    matches,
    parse_rules,
)
from amohook.webhooks.parse import parse_webhook

EXAMPLE = (Path(__file__).resolve().parents[2] / "examples" / "rules.toml").read_text(encoding="utf-8")


def compiled(spec=None, *, task_type_id=1, responsible_user_id=None, **over) -> CompiledRule:
    """A rule as compile_rules would make it, without a store: the task's ids given here."""
    spec = spec or parse_rules(EXAMPLE)[0]
    actions = tuple(
        (kind, CompiledTask(s, task_type_id, responsible_user_id) if kind == "create_task" else s)
        for kind, s in spec.actions
    )
    fields = dict(
        spec=spec,
        account="example",
        pipeline_id=100,
        pipeline_name="Sales",
        to_stage_id=201,
        from_stage_id=None,
        stage_names={(100, 201): "Qualified", (100, 200): "New"},
        user_names={938348: "Anna"},
        field_ids={},
        actions=actions,
    )
    fields.update(over)
    return CompiledRule(**fields)


def plan_kind(kind, rule, change, *, base_time=0.0, timezone=None, fallback="d", lead=None):
    return kinds()[kind].plan(rule, rule.action(kind), change, PlanContext(base_time, timezone, fallback, lead))


def plan_task(rule, change, **kw):
    return plan_kind("create_task", rule, change, **kw)


def plan_note(rule, change, **kw):
    return plan_kind("add_note", rule, change, **kw)


def form(**items) -> bytes:
    from urllib.parse import urlencode

    return urlencode(items).encode()


def lead_item(block: str, action: str, **fields) -> dict:
    def key(name: str) -> str:
        head, bracket, rest = name.partition("[")
        return f"leads[{action}][0][{head}]" + (bracket + rest if bracket else "")

    return {key(k): str(v) for k, v in fields.items()} | {"account[subdomain]": "example"}


def changes_of(body: bytes):
    parsed = parse_webhook(body, "application/x-www-form-urlencoded")
    out = []
    for ev in parsed.events:
        out.extend(lead_changes(ev.entity, ev.action, ev.data))
    return out


# -- the file ---------------------------------------------------------------------------------
def test_the_readme_example_parses():
    [spec] = parse_rules(EXAMPLE)
    assert spec.when == "lead.stage_changed" and spec.pipeline == "Sales" and spec.to_stage == "Qualified"
    assert spec.create_task.type == "Call" and spec.create_task.due == "+1d" and spec.create_task.responsible == "lead"


@pytest.mark.parametrize(
    "text, needle",
    [
        (
            "[[rule]]\nname='a'\nwhen='lead.moved'\n[rule.create_task]\ntype=1\ntext='x'",
            "use one of lead.stage_changed",
        ),
        ("[[rule]]\nname='a'\nwhen='lead.added'", "needs an action"),
        (
            "[[rule]]\nname='a'\nwhen='lead.added'\nto_stage='X'\n[rule.create_task]\ntype=1\ntext='x'",
            "stages need their pipeline",
        ),
        (
            "[[rule]]\nname='a'\nwhen='lead.added'\n[rule.create_task]\ntype=1\ntext='{lead.nam}'",
            "did you mean {lead.name}",
        ),
        ("[[rule]]\nname='a'\nwhen='lead.added'\n[rule.create_task]\ntype=1\ntext='{oops'", "broken braces"),
        (
            "[[rule]]\nname='a'\nwhen='lead.added'\n[rule.create_task]\ntype=1\ntext='x'\ndue='tomorrow'",
            "cannot read due",
        ),
        (
            "[[rule]]\nname='a'\nwhen='lead.added'\ncolour='red'\n[rule.create_task]\ntype=1\ntext='x'",
            "unknown key 'colour'",
        ),
        (
            "[[rule]]\nname='a'\nwhen='lead.added'\n[rule.create_task]\ntype=1\ntext='x'\n[[rule]]\nname='a'\nwhen='lead.added'\n[rule.create_task]\ntype=1\ntext='x'",
            "used twice",
        ),
        (
            "[[rule]]\nname='a'\nwhen='lead.added'\n[[rule.condition]]\nfield='Source'\n[rule.create_task]\ntype=1\ntext='x'",
            "condition #1 needs",
        ),
        ("[[rule]]\nname='a'\nwhen='lead.added'\n[rule.create_task]\ntype=1\ntext='{lead.price:d}'", "format spec"),
        ("[[rule]]\nname='a'\nwhen='lead.added'\n[rule.create_task]\ntype=1\ntext='{lead.name!z}'", "format spec"),
        ("rule = 3", "array of tables"),
        ("[[rule]\n", "not valid TOML"),
    ],
)
def test_bad_rules_are_reported_with_the_rule_name(text, needle):
    with pytest.raises(RulesError) as info:
        parse_rules(text, "rules.toml")
    assert needle in info.value.message
    assert "rules.toml" in info.value.message


def test_every_problem_is_reported_not_just_the_first():
    text = "[[rule]]\nname='a'\nwhen='x'\n[rule.create_task]\ntype=1\ntext='{bad}'\ndue='soon'"
    with pytest.raises(RulesError) as info:
        parse_rules(text)
    assert len(info.value.problems) == 3


def test_template_placeholders_are_checked():
    assert check_template("Call {lead.name} ({lead.price}) in {stage.name}") == []
    assert check_template("{{literal}} braces") == []
    assert "unknown placeholder {lead.phone}" in check_template("{lead.phone}")[0]


# -- due dates --------------------------------------------------------------------------------
BASE = datetime(2026, 3, 10, 14, 30, tzinfo=ZoneInfo("Europe/Moscow")).timestamp()


@pytest.mark.parametrize(
    "due, expected",
    [
        ("+30m", BASE + 1800),
        ("+2h", BASE + 7200),
        ("+1d", BASE + 86400),
        ("+1d4h", BASE + 86400 + 4 * 3600),
        ("+1w", BASE + 7 * 86400),
        ("end_of_day", datetime(2026, 3, 10, 23, 59, tzinfo=ZoneInfo("Europe/Moscow")).timestamp()),
        ("end_of_day+1d", datetime(2026, 3, 11, 23, 59, tzinfo=ZoneInfo("Europe/Moscow")).timestamp()),
        ("10:00+1d", datetime(2026, 3, 11, 10, 0, tzinfo=ZoneInfo("Europe/Moscow")).timestamp()),
        ("10:00", datetime(2026, 3, 11, 10, 0, tzinfo=ZoneInfo("Europe/Moscow")).timestamp()),
        ("18:00", datetime(2026, 3, 10, 18, 0, tzinfo=ZoneInfo("Europe/Moscow")).timestamp()),
    ],
)
def test_due_dates_in_the_accounts_timezone(due, expected):
    assert due_timestamp(due, BASE, "Europe/Moscow") == int(expected)


def test_end_of_day_depends_on_the_timezone():
    # 22:30 in Moscow is still 19:30 in UTC: the same instant ends different days.
    late = datetime(2026, 3, 10, 22, 30, tzinfo=ZoneInfo("UTC")).timestamp()
    moscow = due_timestamp("end_of_day", late, "Europe/Moscow")
    utc = due_timestamp("end_of_day", late, "UTC")
    assert moscow == int(datetime(2026, 3, 11, 23, 59, tzinfo=ZoneInfo("Europe/Moscow")).timestamp())
    assert utc == int(datetime(2026, 3, 10, 23, 59, tzinfo=ZoneInfo("UTC")).timestamp())


# -- recognising stage changes ----------------------------------------------------------------
def test_stage_change_from_a_status_block():
    body = form(
        **lead_item(
            "leads",
            "status",
            id=5,
            status_id=201,
            old_status_id=200,
            pipeline_id=100,
            responsible_user_id=938348,
            name="Acme",
            last_modified=1700000000,
        )
    )
    [change] = changes_of(body)
    assert (change.kind, change.lead_id, change.pipeline_id, change.status_id, change.old_status_id) == (
        "stage_changed",
        5,
        100,
        201,
        200,
    )


def test_stage_change_from_an_update_block_with_a_new_status():
    body = form(
        **lead_item(
            "leads", "update", id=5, status_id=201, old_status_id=200, pipeline_id=100, last_modified=1700000000
        )
    )
    assert [c.kind for c in changes_of(body)] == ["stage_changed"]


def test_update_without_a_status_move_is_not_a_stage_change():
    same = form(**lead_item("leads", "update", id=5, status_id=201, old_status_id=201, pipeline_id=100))
    none = form(**lead_item("leads", "update", id=5, status_id=201, pipeline_id=100))
    assert changes_of(same) == [] and changes_of(none) == []


def test_digital_pipeline_hook_with_only_ids():
    body = form(
        **{
            "leads[status][0][id]": "5",
            "leads[status][0][status_id]": "201",
            "leads[status][0][pipeline_id]": "100",
            "leads[status][0][old_status_id]": "200",
            "leads[status][0][old_pipeline_id]": "100",
            "account[id]": "1",
            "account[subdomain]": "example",
        }
    )
    [change] = changes_of(body)
    assert change.kind == "stage_changed" and change.name is None and change.responsible_user_id is None


def test_real_2016_status_capture_is_a_stage_change():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "fixtures" / "webhooks" / "01_lead_status_2016.txt").read_text()
    body = text.split("\n\n", 1)[1].strip().encode()
    [change] = changes_of(body)
    assert (change.lead_id, change.pipeline_id, change.status_id, change.old_status_id) == (
        31926520,
        2116,
        10216994,
        10216995,
    )


def test_responsible_change_and_lead_added():
    body = form(**lead_item("leads", "responsible", id=5, responsible_user_id=2, old_responsible_user_id=1))
    assert [c.kind for c in changes_of(body)] == ["responsible_changed"]
    body = form(**lead_item("leads", "add", id=5, status_id=201, pipeline_id=100))
    assert [c.kind for c in changes_of(body)] == ["added"]


# -- matching ---------------------------------------------------------------------------------
def change(**over):
    body = dict(
        id=5,
        status_id=201,
        old_status_id=200,
        pipeline_id=100,
        responsible_user_id=938348,
        name="Acme",
        last_modified=1700000000,
    )
    body.update(over)
    return changes_of(form(**lead_item("leads", "status", **body)))[0]


def test_stage_is_matched_with_its_pipeline():
    rule = compiled()
    assert matches(rule, change())
    assert not matches(rule, change(status_id=202))
    # The same status id in another pipeline (142/143 exist everywhere) is another stage.
    assert not matches(rule, change(pipeline_id=999))


def test_from_stage_narrows_the_rule():
    rule = compiled(from_stage_id=200)
    assert matches(rule, change())
    assert not matches(rule, change(old_status_id=199))


def test_conditions_on_custom_fields():
    text = EXAMPLE + "[[rule.condition]]\nfield = 'Source'\nequals = 'Website'\n"
    rule = compiled(parse_rules(text)[0])
    with_field = {
        "custom_fields[0][id]": "7",
        "custom_fields[0][name]": "Source",
        "custom_fields[0][values][0][value]": "website",
    }
    assert matches(rule, change(**with_field))
    with_field["custom_fields[0][values][0][value]"] = "Phone"
    assert not matches(rule, change(**with_field))
    assert not matches(rule, change())


# -- planning and keys ------------------------------------------------------------------------
def test_plan_renders_the_task_for_the_leads_responsible_user():
    rule = compiled()
    task = plan_task(rule, change(), base_time=BASE, timezone="Europe/Moscow", fallback="d1")
    assert task.payload["text"] == "Call Acme about the offer"
    assert task.payload["responsible_user_id"] == 938348
    assert task.payload["entity_id"] == 5 and task.payload["entity_type"] == "leads"
    assert task.payload["task_type_id"] == 1
    assert task.payload["complete_till"] == int(BASE + 86400)
    assert task.payload["request_id"] == task.key[:32]


def test_same_change_as_status_and_as_update_has_one_key():
    rule = compiled()
    fields = dict(
        id=5, status_id=201, old_status_id=200, pipeline_id=100, responsible_user_id=1, last_modified=1700000000
    )
    via_status = changes_of(form(**lead_item("leads", "status", **fields)))[0]
    via_update = changes_of(form(**lead_item("leads", "update", **fields)))[0]
    assert action_key(rule, via_status, "d1") == action_key(rule, via_update, "d2")


def test_a_later_move_into_the_same_stage_is_a_new_change():
    rule = compiled()
    first = change(last_modified=1700000000)
    again = change(last_modified=1700009999)
    assert action_key(rule, first, "d") != action_key(rule, again, "d")


def test_hooks_without_a_time_fall_back_to_the_delivery():
    rule = compiled()
    dp = changes_of(
        form(
            **{
                "leads[status][0][id]": "5",
                "leads[status][0][status_id]": "201",
                "leads[status][0][pipeline_id]": "100",
                "leads[status][0][old_status_id]": "200",
            }
        )
    )[0]
    assert action_key(rule, dp, "delivery:1") == action_key(rule, dp, "delivery:1")
    assert action_key(rule, dp, "delivery:1") != action_key(rule, dp, "delivery:2")


def test_a_named_responsible_overrides_the_lead():
    rule = compiled(responsible_user_id=42)
    task = plan_task(rule, change(), base_time=BASE, timezone=None, fallback="d")
    assert task.payload["responsible_user_id"] == 42


# -- a second action: a note on the lead ------------------------------------------------------
NOTE_RULE = (
    EXAMPLE
    + """[rule.add_note]
text = "Moved to {stage.name} from {from_stage.name}; call task for {responsible.name}"
"""
)


def test_a_rule_may_add_a_note_besides_or_instead_of_a_task():
    [both] = parse_rules(NOTE_RULE)
    assert both.create_task is not None and both.add_note.text.startswith("Moved to")
    only_note = "[[rule]]\nname='n'\nwhen='lead.added'\n[rule.add_note]\ntext='New lead {lead.name}'"
    [spec] = parse_rules(only_note)
    assert spec.create_task is None and spec.add_note is not None
    with pytest.raises(RulesError) as info:
        parse_rules("[[rule]]\nname='n'\nwhen='lead.added'\n[rule.add_note]\ntext='{lead.phone}'")
    assert "add_note text: unknown placeholder {lead.phone}" in info.value.message


def test_the_note_is_planned_with_its_own_key():
    rule = compiled(parse_rules(NOTE_RULE)[0])
    note = plan_note(rule, change(), fallback="d1")
    task = plan_task(rule, change(), base_time=BASE, timezone=None, fallback="d1")
    assert note.kind == "add_note" and task.kind == "create_task"
    assert note.key != task.key
    assert note.payload == {
        "entity_id": 5,
        "note_type": "common",
        "params": {"text": "Moved to Qualified from New; call task for Anna"},
        "request_id": note.key[:32],
    }
    assert plan_note(rule, change(), fallback="d2").key == note.key  # the change, not the delivery


# -- the task.completed trigger ------------------------------------------------------------------
def fixture_body(name: str) -> bytes:
    text = (Path(__file__).resolve().parents[1] / "fixtures" / "webhooks" / name).read_text(encoding="utf-8")
    return "".join(line for line in text.splitlines() if line and not line.startswith("#")).encode()


def test_the_documented_task_update_is_a_completed_task_on_its_lead():
    from amohook.rules import rule_changes

    parsed = parse_webhook(fixture_body("20_task_update_docs.txt"), "application/x-www-form-urlencoded")
    [event] = parsed.events
    [change] = rule_changes(event.entity, event.action, event.data)
    assert (change.kind, change.lead_id, change.task_id, change.task_type_id) == (
        "task_completed",
        33322211,
        11122233,
        1,
    )
    assert change.pipeline_id is None and change.task_text == "Follow-up"


@pytest.mark.parametrize("override", [{"action_close": "0"}, {"element_type": "1"}, {"element_id": "0"}])
def test_a_task_update_that_did_not_close_a_lead_task_is_no_change(override):
    from amohook.rules import task_changes

    data = {"id": "5", "element_id": "7", "element_type": "2", "task_type": "1", "status": "1", "action_close": "1"}
    assert task_changes("tasks", "update", data)
    assert task_changes("tasks", "update", {**data, **override}) == []


def test_a_completed_task_is_keyed_by_the_task_alone():
    from amohook.rules import task_changes

    data = {
        "id": "5",
        "element_id": "7",
        "element_type": "2",
        "task_type": "1",
        "action_close": "1",
        "last_modified": "2017-07-21 19:00:00",
    }
    rule = compiled()
    [first] = task_changes("tasks", "update", data)
    [again] = task_changes("tasks", "update", {**data, "last_modified": "2017-07-21 19:00:05"})
    assert action_key(rule, first, "d1") == action_key(rule, again, "d2")


def test_task_rules_need_the_lead_where_the_rule_says():
    from dataclasses import replace

    from amohook.rules import task_changes

    text = (
        "[[rule]]\nname='t'\nwhen='task.completed'\ntask_type='Call'\npipeline='Sales'\nstage='Qualified'\n"
        "[rule.add_note]\ntext='done: {task.text}'\n"
    )
    rule = replace(compiled(parse_rules(text)[0], to_stage_id=None, stage_id=201), task_type_id=1)  # the trigger's
    [change] = task_changes(
        "tasks",
        "update",
        {"id": "5", "element_id": "7", "element_type": "2", "task_type": "1", "action_close": "1", "text": "Call"},
    )
    assert not matches(rule, change)  # where the lead is must be read first
    assert matches(rule, replace(change, pipeline_id=100, status_id=201))
    assert not matches(rule, replace(change, pipeline_id=100, status_id=200))
    assert not matches(rule, replace(change, pipeline_id=100, status_id=201, task_type_id=2))
    note = plan_note(rule, replace(change, pipeline_id=100, status_id=201))
    assert note.payload["params"]["text"] == "done: Call"


def test_parsing_refuses_task_keys_on_other_triggers():
    with pytest.raises(RulesError) as info:
        parse_rules("[[rule]]\nname='a'\nwhen='lead.added'\ntask_type='Call'\n[rule.add_note]\ntext='x'")
    assert "task_type only makes sense with when = 'task.completed'" in info.value.message


# -- cycles ------------------------------------------------------------------------------------
def mover(name, to_stage_id, target, *, from_stage_id=None):
    from amohook.actions.move import CompiledMove

    text = f"[[rule]]\nname='{name}'\nwhen='lead.stage_changed'\n[rule.move_lead]\nto_stage='x'\n"
    return compiled(
        parse_rules(text)[0],
        to_stage_id=to_stage_id,
        from_stage_id=from_stage_id,
        actions=(("move_lead", CompiledMove(100, target, "x")),),
    )


def test_rules_that_move_leads_in_a_circle_are_found():
    from amohook.rules.cycles import cycle_problems

    assert cycle_problems([mover("a", 201, 202), mover("b", 202, 203)]) == []
    [problem] = cycle_problems([mover("a", 201, 202), mover("b", 202, 203), mover("c", 203, 201)])
    assert "move leads in a circle" in problem and "'a'" in problem and "'c'" in problem
    # b fires only when the lead came from 200; a's move comes from 201: no cycle.
    assert cycle_problems([mover("a", 201, 202), mover("b", 202, 201, from_stage_id=200)]) == []
    # A rule for any stage that moves leads on ends where its own move lands.
    assert cycle_problems([mover("any", None, 202)]) == []


def test_the_readme_actions_example_parses():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme.split("Completing a call moves the lead on", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    call, chat = parse_rules(block)
    assert (call.when, call.task_type, call.stage) == ("task.completed", "Call", "Qualified")
    assert [k for k, _ in call.actions] == ["move_lead", "set_field"] and call.set_field.tag == "called"
    assert chat.notify.url_env == "SALES_CHAT_URL" and chat.notify.json["lead"] == {"id": "{lead.id}"}
