"""lead.stale: a lead that stays in a stage for `after` gets its task once per stay.

The fake amoCRM holds the leads, their moves (with events-log entries) and the tasks; webhooks go
through the listener's write path; the stale check runs with a controllable clock (no test sleeps
a minute); workers, `events replay` and `rules check` are the real CLI. Every test runs on SQLite,
MariaDB and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from amohook.amocrm.client import client_for
from amohook.rules import load_and_compile, parse_rules
from amohook.rules.spec import RulesError
from amohook.rules.stale import StaleCheck
from amohook.store.models import Action, Event, StaleEntry
from tests.conftest import run_cli
from tests.helpers.reconcile import amohook_process, deliver, tasks_per_lead, work

STALE_RULES = """
[[rule]]
name = "Stalled in Qualified"
when = "lead.stale"
pipeline = "Sales"
stage = "Qualified"
after = "1m"

[rule.create_task]
type = "Call"
text = "{lead.name} has waited in {stage.name}"
due = "+1d"
"""


@pytest.fixture
def stale(crm, tmp_path):
    rules = tmp_path / "stale.toml"
    rules.write_text(STALE_RULES)
    return {**crm, "rules": str(rules)}


def check(store, rules: str, now: float):
    """One stale check of the account at ``now`` (amohook's clock)."""
    return StaleCheck(store, load_and_compile(rules), clock=lambda: now).check("example", client_for(store, "example"))


def enter(store, fake, stale, lead_id: int, at: int, *, webhook: bool = True) -> None:
    """Move the lead into Qualified at ``at``; its webhook reaches amohook and is handled."""
    item = fake.move_lead(lead_id, stale["qualified"], stale["pipeline"], at=at)
    if webhook:
        deliver(store, fake, "status", [item])
        work(store, stale)


def lead(fake, stale, lead_id: int, name: str = "Acme", at: float | None = None) -> int:
    fake.add_lead(name, stale["pipeline"], stale["new"], stale["anna"], lead_id=lead_id)
    if at is not None:
        fake.leads[lead_id].update(created_at=int(at), updated_at=int(at))
    return lead_id


def test_a_lead_that_stays_gets_one_task_and_one_that_leaves_in_time_none(store, fake, stale):
    now = int(time.time())
    stays, leaves = lead(fake, stale, 8001, "Stays"), lead(fake, stale, 8002, "Leaves")
    enter(store, fake, stale, stays, now - 50)
    enter(store, fake, stale, leaves, now - 40)
    first = check(store, stale["rules"], now)
    assert (first.in_stage, first.queued, first.looked_up, first.waiting) == (2, 0, 0, 0)  # not a minute yet
    item = fake.move_lead(leaves, stale["new"], stale["pipeline"], at=now - 5)  # leaves in time
    deliver(store, fake, "status", [item])
    work(store, stale)
    later = check(store, stale["rules"], now + 30)  # 80 s after the first entered
    assert (later.in_stage, later.queued) == (1, 1)
    work(store, stale)
    assert tasks_per_lead(fake) == {stays: 1}
    [task] = fake.tasks.values()
    assert task["text"] == "Stays has waited in Qualified" and task["responsible_user_id"] == stale["anna"]
    # Checks after it, restarts (a new StaleCheck) and workers again: nothing more.
    for t in (now + 60, now + 3600, now + 86400):
        assert check(store, stale["rules"], t).queued == 0
    work(store, stale)
    assert len(fake.tasks) == 1
    assert list(StaleEntry.select(StaleEntry.lead_id, StaleEntry.how).tuples()) == [(stays, "registry")]
    [event] = Event.select().where(Event.source == "stale")
    assert (event.action, event.entity_id, event.status) == ("stale", str(stays), "done")


def test_leaving_and_coming_back_is_a_new_stay(store, fake, stale):
    now = int(time.time())
    lead_id = lead(fake, stale, 8101)
    enter(store, fake, stale, lead_id, now - 600)
    assert check(store, stale["rules"], now - 400).queued == 1
    work(store, stale)
    item = fake.move_lead(lead_id, stale["new"], stale["pipeline"], at=now - 300)
    deliver(store, fake, "status", [item])
    work(store, stale)
    assert check(store, stale["rules"], now - 290).in_stage == 0
    enter(store, fake, stale, lead_id, now - 120)  # back in Qualified: a second stay
    assert check(store, stale["rules"], now).queued == 1
    work(store, stale)
    assert tasks_per_lead(fake) == {lead_id: 2}
    assert check(store, stale["rules"], now + 600).queued == 0
    work(store, stale)
    assert len(fake.tasks) == 2


def test_a_lead_already_in_the_stage_counts_from_when_it_entered(store, fake, stale):
    """Leads that entered before amohook watched: the events log says when; a lead the log shows no
    move for was created in the stage; a lead moved in just now whose traces are not in yet waits."""
    now = int(time.time())
    old = lead(fake, stale, 8201, "Old", at=now - 86400)
    enter(store, fake, stale, old, now - 3600, webhook=False)  # amohook never saw it: the log did
    recent = lead(fake, stale, 8202, "Recent", at=now - 86400)
    enter(store, fake, stale, recent, now - 30, webhook=False)  # in the log, not a minute yet
    born = 8203  # created in the stage two hours ago, never moved
    fake.add_lead("Born here", stale["pipeline"], stale["qualified"], stale["anna"], lead_id=born)
    fake.leads[born].update(created_at=now - 7200, updated_at=now - 7200)
    fresh = lead(fake, stale, 8204, "Fresh", at=now - 86400)
    fake.move_lead(fresh, stale["qualified"], stale["pipeline"], at=now - 20, log=False)  # no trace yet

    result = check(store, stale["rules"], now)
    assert (result.in_stage, result.looked_up, result.waiting, result.queued) == (4, 4, 1, 2)
    # Ten leads a log request: one request for the listing, one for the four looked up.
    assert result.requests == 2
    hows = dict(StaleEntry.select(StaleEntry.lead_id, StaleEntry.how).tuples())
    assert hows == {old: "events_log", recent: "events_log", born: "created"}
    work(store, stale)
    assert tasks_per_lead(fake) == {old: 1, born: 1}
    # Settled once: the next check reads no log, and the recent one fires on time, once.
    again = check(store, stale["rules"], now + 60)
    assert (again.looked_up, again.queued, again.requests) == (1, 1, 2)  # only the fresh one is looked for
    work(store, stale)
    assert tasks_per_lead(fake) == {old: 1, born: 1, recent: 1}


def test_a_replayed_stale_event_and_a_second_worker_make_no_second_task(store, fake, stale):
    now = int(time.time())
    lead_id = lead(fake, stale, 8301)
    enter(store, fake, stale, lead_id, now - 120)
    assert check(store, stale["rules"], now).queued == 1
    work(store, stale)
    [event] = Event.select().where(Event.source == "stale")
    result = run_cli(["events", "replay", str(event.id)], store.url)
    assert result.returncode == 0, result.stderr
    work(store, stale)
    work(store, stale)
    assert len(fake.tasks) == 1
    assert Action.select().count() == 1
    shown = run_cli(["events", "show", str(event.id), "--json"], store.url)
    assert shown.returncode == 0, shown.stderr
    assert '"stale"' in shown.stdout
    shown = run_cli(["events", "show", str(event.id)], store.url)  # as a person reads it
    assert shown.returncode == 0 and "stale" in shown.stdout, shown.stderr
    explained = run_cli(["rules", "explain", "--rules", stale["rules"], "--lead", str(lead_id), "--json"], store.url)
    assert explained.returncode == 0, explained.stderr
    [stay] = [c for c in json.loads(explained.stdout)["changes"] if c["kind"] == "stale"]
    assert stay["what"] == "in 'Qualified' of 'Sales' for 1m" and stay["seen"] == [f"stale check (event {event.id})"]
    [verdict] = stay["rules"]
    assert verdict["fired"] and [a["amocrm_id"] for a in verdict["actions"]] == list(fake.tasks)
    listed = run_cli(["events", "list"], store.url)
    assert listed.returncode == 0 and "stale" in listed.stdout, listed.stderr


@pytest.mark.slow
def test_kill_9_while_serving_makes_no_second_task(store, fake, stale):
    """A real worker with the check every second, killed with SIGKILL and started again."""
    now = int(time.time())
    leads = [lead(fake, stale, 8400 + i, f"Lead {i}") for i in range(20)]
    for i, lead_id in enumerate(leads):
        enter(store, fake, stale, lead_id, now - 120 - i, webhook=False)
    args = ["worker", "--rules", stale["rules"], "--reconcile", "1s", "--lease", "2", "--log-level", "warning"]
    for _ in range(2):
        proc = amohook_process(store.url, args)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(fake.tasks) < 5:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # Time passes: the killed sender's batch in flight is free again (its lease ran out), and is
    # looked up in amoCRM before anything is sent again.
    with store.write():
        Action.update(lease_until=0).where(Action.status == "sending").execute()
    proc = amohook_process(store.url, args)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(fake.tasks) < len(leads):
        time.sleep(0.1)
    time.sleep(2.5)  # two more checks
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)
    assert tasks_per_lead(fake) == {lead_id: 1 for lead_id in leads}


def test_rules_check_validates_a_stale_rule(store, stale, tmp_path):
    result = run_cli(["rules", "check", "--rules", stale["rules"], "--json"], store.url)
    assert result.returncode == 0, result.stderr
    [summary] = json.loads(result.stdout)
    assert (summary["when"], summary["stage_id"], summary["after_seconds"]) == ("lead.stale", stale["qualified"], 60)
    bad = tmp_path / "bad.toml"
    bad.write_text(STALE_RULES.replace('stage = "Qualified"', 'stage = "Qualifed"'))
    result = run_cli(["rules", "check", "--rules", str(bad)], store.url)
    assert result.returncode == 2 and "Qualifed" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "change, problem",
    [
        ('after = "1m"', None),
        ('after = "30s"', "too short"),
        ('after = "three days"', "not a duration"),
        ('after = "1m"\nto_stage = "New"', "write stage ="),
    ],
)
def test_the_stale_rule_shape(change, problem):
    text = STALE_RULES.replace('after = "1m"', change)
    if problem is None:
        [spec] = parse_rules(text)
        assert (spec.when, spec.after, spec.stage) == ("lead.stale", 60, "Qualified")
        return
    with pytest.raises(RulesError) as err:
        parse_rules(text)
    assert problem in str(err.value)


def test_a_stale_rule_needs_its_stage_and_after():
    with pytest.raises(RulesError) as err:
        parse_rules(STALE_RULES.replace('stage = "Qualified"\n', "").replace('after = "1m"\n', ""))
    assert "needs pipeline" in str(err.value) and "needs after" in str(err.value)
    with pytest.raises(RulesError) as err:
        parse_rules(STALE_RULES.replace('when = "lead.stale"', 'when = "lead.stage_changed"'))
    assert "after only makes sense" in str(err.value)


def test_the_readme_stale_example_parses():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme.split("A lead that sits in a stage too long", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    [rule] = parse_rules(block)
    assert (rule.when, rule.pipeline, rule.stage, rule.after) == ("lead.stale", "Sales", "Proposal", 3 * 86400)
    assert rule.create_task.due == "end_of_day"


def second_store(tmp_path, fake):
    """Another store on the same amoCRM account (a second installation), synced and authorized."""
    from amohook.amocrm.oauth import Client, TokenPair
    from amohook.store import open_store
    from amohook.sync import sync_entities
    from amohook.tokens import save_authorization

    other = open_store(f"sqlite:///{tmp_path / 'other.db'}")
    access, refresh = fake.issue_tokens()
    save_authorization(
        other,
        subdomain="example",
        base_url=fake.base_url,
        client=Client(fake.client_id, fake.client_secret, fake.redirect_uri),
        pair=TokenPair(access_token=access, refresh_token=refresh, expires_in=86400, issued_at=time.time()),
    )
    sync_entities(other, client_for(other, "example"))
    return other


def test_a_second_store_on_the_account_recognises_the_task_of_the_stay(store, fake, stale, tmp_path):
    """Store A saw the webhook (its time names the stay); store B, started later, learns the entry
    from the log three seconds apart: B's task would be due at another time, and is still not made."""
    now = int(time.time())
    lead_id = lead(fake, stale, 8501, "Shared")
    item = fake.move_lead(lead_id, stale["qualified"], stale["pipeline"], at=now - 120, log_offset=3)
    deliver(store, fake, "status", [item])
    work(store, stale)
    assert check(store, stale["rules"], now).queued == 1
    work(store, stale)
    assert len(fake.tasks) == 1
    other = second_store(tmp_path, fake)
    try:
        result = check(other, stale["rules"], now + 90)
        assert (result.looked_up, result.queued) == (1, 1)
        assert StaleEntry.get().entered_at == now - 117  # the log's time, not the webhook's
        work(other, stale)
        assert len(fake.tasks) == 1
        [action] = Action.select()
        assert action.status == "done" and "already in amoCRM for this change" in action.last_error
    finally:
        other.close()


def test_a_fast_host_clock_does_not_fire_early(store, fake, stale):
    """Entry times are amoCRM's: with this host's clock two minutes ahead of amoCRM's, a lead that
    entered 40 s ago (amoCRM's time) is not a minute in the stage yet."""
    fake.set_clock_behind(120)
    amo_now = int(fake._clock())
    lead_id = lead(fake, stale, 8601)
    enter(store, fake, stale, lead_id, amo_now - 40)
    assert check(store, stale["rules"], time.time()).queued == 0
    assert check(store, stale["rules"], time.time() + 30).queued == 1


def test_with_reconciliation_off_stale_rules_say_they_never_fire(store, stale, caplog):
    from amohook.runtime.supervisor import Supervisor

    runner = Supervisor(store, rules=stale["rules"], reconcile_every=None)
    assert runner.stale is not None
    with caplog.at_level("WARNING", logger="amohook.runner"):
        runner.start()
        runner.stop()
    assert any("--reconcile is off" in r.getMessage() for r in caplog.records)
