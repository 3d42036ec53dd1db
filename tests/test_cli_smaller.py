"""The smaller items of issue 14: `rules check` names task types, `worker --once` says when events
went dead, an events-log delivery says where it came from, the README and the examples agree."""

from __future__ import annotations

from tests.conftest import run_cli
from tests.test_rules_e2e import crm  # noqa: F401  (the fixture: Sales, Call, Anna, the README's rule)


def test_rules_check_shows_the_task_types_name_even_when_the_rule_gives_its_id(store, crm, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(
        "[[rule]]\nname = 'by id'\nwhen = 'lead.stage_changed'\npipeline = 'Sales'\nto_stage = 'Qualified'\n"
        f"[rule.create_task]\ntype = {crm['call']}\ntext = 'x'\n"
    )
    result = run_cli(["rules", "check", "--rules", str(rules)], store.url)
    assert result.returncode == 0, result.stderr
    assert "a task of type 'Call'" in result.stdout, result.stdout
    assert f"task type {crm['call']}" not in result.stdout
    as_json = run_cli(["rules", "check", "--rules", str(rules), "--json"], store.url)
    assert '"task_type": "Call"' in as_json.stdout and f'"task_type_id": {crm["call"]}' in as_json.stdout
