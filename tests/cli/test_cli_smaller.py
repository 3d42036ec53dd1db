"""The smaller items of issue 14: `rules check` names task types, `worker --once` says when events
went dead, an events-log delivery says where it came from, the README and the examples agree."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


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


@pytest.mark.slow
def test_worker_once_exits_6_when_events_went_dead_in_its_run(store, tmp_path):
    """Cron's `worker --once` must not report success while events it ran went dead: exit 6
    (UNHEALTHY, a person must look), one line naming them; a later run with nothing dead is 0."""
    import os
    from urllib.parse import urlencode

    from amohook.inbox import Incoming, store_deliveries
    from amohook.webhooks.parse import parse_webhook
    from tests.conftest import ROOT, cli_env

    (tmp_path / "deadhook.py").write_text(
        "from amohook.worker import PermanentError\n\n"
        "def handle(event, ctx):\n    raise PermanentError('this event cannot be handled')\n"
    )
    form = "application/x-www-form-urlencoded"
    body = urlencode({"account[subdomain]": "example", "leads[add][0][id]": "5001"}).encode()
    store_deliveries(store, [Incoming(body=body, parsed=parse_webhook(body, form), content_type=form)])
    env = cli_env(store.url, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    args = ["worker", "--handler", "deadhook:handle", "--once", "--reconcile", "off", "--log-level", "error"]
    first = run_cli(args, store.url, env=env)
    assert first.returncode == 6, (first.returncode, first.stderr)
    assert "processed 1 event(s)" in first.stdout
    assert "error: 1 event(s) went dead in this run (1) — `amohook events show ID` says why" in first.stderr
    again = run_cli(args, store.url, env=env)  # the dead event is not this run's
    assert again.returncode == 0 and "went dead" not in again.stderr, again.stderr


def test_an_events_log_delivery_says_where_it_came_from(store, fake, crm):
    import json

    lead = fake.add_lead("Acme", crm["pipeline"], crm["new"], crm["anna"], lead_id=7001)
    fake.move_lead(lead["id"], crm["qualified"], crm["pipeline"])
    assert run_cli(["reconcile", "--since", "1h"], store.url).returncode == 0
    shown = run_cli(["events", "show", "1"], store.url)
    assert shown.returncode == 0, shown.stderr
    assert "from amoCRM's events log (reconciliation)" in shown.stdout and "from ?" not in shown.stdout
    as_json = json.loads(run_cli(["events", "show", "1", "--json"], store.url).stdout)
    assert as_json["source"] == "events_log" and as_json["delivery"]["remote_addr"] is None


README = (__import__("pathlib").Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_every_option_of_every_command_is_in_the_readme():
    import re

    from tests.helpers.commands import all_commands

    missing = sorted(
        {
            opt
            for _, command in all_commands()
            for param in command.params
            for opt in param.opts
            if opt.startswith("--") and opt != "--help" and not re.search(rf"{re.escape(opt)}(?![\w-])", README)
        }
    )
    assert not missing, f"options missing from README.md: {missing}"
    from amohook.cli.app import command

    root = command()
    assert all(opt in README for param in root.params for opt in param.opts if opt.startswith("--"))


def test_the_readmes_shell_lines_work_where_editor_is_unset():
    """A fresh VPS often has no $EDITOR: `$EDITOR rules.toml` would run `rules.toml`."""
    import re

    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", README, re.S)
    bare = [line for block in blocks for line in block.splitlines() if re.search(r"\$EDITOR\b|\$\{EDITOR\}", line)]
    assert not bare, bare
    assert "${EDITOR:-nano} rules.toml" in README


def test_every_readme_section_cited_exists():
    """What cites a README section by name (examples, cron file, docs, code) names one that is there."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    headings = [h.strip() for h in re.findall(r"^#{2,4} (.+)$", README, re.M)]
    files = [*root.glob("examples/*"), root / "crontab.example", *root.glob("docs/*.md"), *root.glob("amohook/**/*.py")]
    cited = [
        (path.relative_to(root), name)
        for path in files
        if path.is_file()
        for name in re.findall(r"README(?:\.md)?(?:'s)?,? \"([^\"]+)\"", path.read_text(encoding="utf-8"))
    ]
    assert any(str(path) == "examples/rules.toml" for path, _ in cited), cited
    wrong = [(str(path), name) for path, name in cited if not any(h.startswith(name) for h in headings)]
    assert not wrong, (wrong, headings)
