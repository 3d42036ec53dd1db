"""`amohook doctor`: a healthy setup is all ✓ and exit 0; each broken thing is its own ✗ (or !).

The real CLI against the fake amoCRM and a real database (SQLite, MariaDB, PostgreSQL): one thing
is broken at a time and exactly that check must fail, with the documented exit code.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlencode

import pytest

from amohook.amocrm.client import client_for
from amohook.errors import ExitCode
from amohook.inbox import Incoming, store_deliveries
from amohook.recovery.watchdog import remember
from amohook.store.models import Account, Action, Event, ReconcileState, SchemaVersion
from amohook.sync import sync_entities
from amohook.webhooks.parse import parse_webhook
from tests.conftest import run_cli
from tests.helpers.e2e import RULES

FORM = "application/x-www-form-urlencoded"
SECRET_URL = "https://hooks.example.com/webhook/s3cr3t-webhook-path"


@pytest.fixture
def healthy(store, fake, account, tmp_path):
    """Synced, a valid rules file, one done event, a subscription the watchdog found on, a fresh pass."""
    pipeline = fake.add_pipeline("Sales", ["New", "Qualified"])
    fake.add_task_type("Call")
    fake.add_user("Anna", "anna@example.com")
    sync_entities(store, client_for(store, "example"))
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    [event_id] = queue(store, 5001)
    with store.write():
        Event.update(status="done").where(Event.id == event_id).execute()
    remember(store, "example", SECRET_URL, ["status_lead"])
    now = time.time()
    with store.write():
        ReconcileState.insert(
            account="example", cursor=int(now), last_pass_at=now, subscription_state="ok", subscription_checked_at=now
        ).execute()
    return dict(rules=str(rules), pipeline=pipeline["id"])


def queue(store, lead: int, **fields) -> list[int]:
    """One webhook as the listener stores it; its event's fields then set as given."""
    body = urlencode(
        {
            "account[subdomain]": "example",
            "leads[status][0][id]": str(lead),
            "leads[status][0][status_id]": "2",
            "leads[status][0][old_status_id]": "1",
            "leads[status][0][pipeline_id]": "9",
            "leads[status][0][last_modified]": "1750000000",
        }
    ).encode()
    store_deliveries(store, [Incoming(body=body, parsed=parse_webhook(body, FORM), content_type=FORM)])
    ids = [e.id for e in Event.select(Event.id).where(Event.entity_id == str(lead))]
    if fields:
        with store.write():
            Event.update(**fields).where(Event.id.in_(ids)).execute()
    return ids


def doctor(store, healthy, *extra: str):
    """Run `amohook doctor --json`; returns (exit code, {(name, severity) of what is not ok}, checks)."""
    result = run_cli(["doctor", "--json", "--rules", healthy["rules"], *extra], store.url)
    assert result.stdout, result.stderr
    data = json.loads(result.stdout)
    bad = {(c["name"], c["severity"]) for c in data["checks"] if not c["ok"]}
    return result.returncode, bad, {c["name"]: c for c in data["checks"]}


def secrets_of(store, fake) -> list[str]:
    account = Account.get(Account.subdomain == "example")
    return [account.access_token, account.refresh_token, fake.client_secret, "s3cr3t-webhook-path"]


def test_a_healthy_setup_is_all_ticks_and_exit_0(store, fake, healthy):
    result = run_cli(["doctor", "--rules", healthy["rules"]], store.url)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    checks = [line for line in lines if not line.startswith("all ")]
    assert checks and all(line.startswith("✓ ") for line in checks), result.stdout
    for name in (
        "database",
        "token (example)",
        "refresh token (example)",
        "clock (example)",
        "rules",
        "webhook subscriptions (example)",
        "reconciliation (example)",
        "dead events",
        "pending events",
        "failed actions",
    ):
        assert any(line.startswith(f"✓ {name}:") for line in checks), (name, result.stdout)
    assert lines[-1] == f"all {len(checks)} checks passed"
    assert ("disk space" in result.stdout) == store.is_sqlite
    for secret in secrets_of(store, fake):
        assert secret not in result.stdout + result.stderr

    quiet = run_cli(["doctor", "--quiet", "--rules", healthy["rules"]], store.url)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")


def test_a_revoked_grant_is_one_failing_check(store, fake, healthy):
    fake.revoke_all()
    fake.expire_access_tokens()
    code, bad, checks = doctor(store, healthy)
    assert (code, bad) == (ExitCode.UNHEALTHY, {("token", "error")})
    assert "init-auth --subdomain example" in checks["token"]["fix"]
    # Text: the ✗ line, then its fix; nothing shows a token.
    result = run_cli(["doctor", "--quiet", "--rules", healthy["rules"]], store.url)
    assert result.returncode == ExitCode.UNHEALTHY
    assert result.stdout.splitlines()[0].startswith("✗ token (example): ")
    assert result.stdout.splitlines()[1].startswith("    fix: run `amohook init-auth --subdomain example`")
    assert len(result.stdout.splitlines()) == 2
    for secret in secrets_of(store, fake):
        assert secret not in result.stdout + result.stderr


def test_amocrm_failing_is_the_token_check_alone(store, fake, healthy):
    fake.fail("/api/v4/account", status=503, times=None)
    code, bad, checks = doctor(store, healthy)
    assert (code, bad) == (ExitCode.UNHEALTHY, {("token", "error")})
    assert "503" in checks["token"]["detail"] and "clock" not in checks


def test_a_skewed_clock_warns(store, fake, healthy):
    fake.date_offset = 300  # amoCRM's clock five minutes ahead of ours
    code, bad, checks = doctor(store, healthy)
    assert (code, bad) == (ExitCode.DEGRADED, {("clock", "warning")})
    assert "behind amoCRM's" in checks["clock"]["detail"]
    fake.date_offset = 20  # under 60 s is fine
    assert doctor(store, healthy)[:2] == (0, set())


def test_an_old_refresh_token_warns(store, fake, healthy):
    with store.write():
        Account.update(issued_at=time.time() - 70 * 86400).where(Account.subdomain == "example").execute()
    code, bad, checks = doctor(store, healthy)
    assert (code, bad) == (ExitCode.DEGRADED, {("refresh token", "warning")})
    assert "70d old" in checks["refresh token"]["detail"]
    # The fix names where the renewal runs in the README's service: its timer (or cron).
    assert "systemctl list-timers 'amohook-*'" in checks["refresh token"]["fix"]


def test_a_refresh_cron_refused_as_revoked_fails_while_the_access_token_still_works(store, fake, healthy):
    from amohook.errors import TokenRevoked

    with store.write():
        Account.update(last_refresh_error=TokenRevoked("example").message).execute()
    code, bad, checks = doctor(store, healthy)
    assert (code, bad) == (ExitCode.UNHEALTHY, {("refresh token", "error")})
    assert "init-auth --subdomain example" in checks["refresh token"]["fix"]


def test_a_refresh_without_an_answer_warns_with_its_own_fix(store, fake, healthy):
    from amohook.amocrm.oauth import _outcome_unknown

    with store.write():
        Account.update(last_refresh_error=_outcome_unknown(fake.base_url, "example", "ReadTimeout").message).execute()
    code, bad, checks = doctor(store, healthy)
    assert (code, bad) == (ExitCode.DEGRADED, {("refresh token", "warning")})
    assert "refresh-token --force --subdomain example" in checks["refresh token"]["fix"]


def test_an_expired_access_token_is_refreshed_and_said(store, fake, healthy):
    fake.expire_access_tokens()  # cron did not refresh in time
    code, bad, checks = doctor(store, healthy)
    assert (code, bad) == (ExitCode.DEGRADED, {("refresh token", "warning")})
    assert checks["token"]["ok"] and "cron" in checks["refresh token"]["fix"]


def test_an_invalid_rules_file_lists_its_problems(store, fake, healthy, tmp_path):
    bad_rules = tmp_path / "bad.toml"
    bad_rules.write_text(RULES.replace('to_stage = "Qualified"', 'to_stage = "Qualifed"'))
    assert bad_rules.read_text() != RULES
    code, bad, checks = doctor(store, healthy, "--rules", str(bad_rules))
    assert (code, bad) == (ExitCode.UNHEALTHY, {("rules", "error")})
    assert "Qualifed" in checks["rules"]["detail"] and "Qualified" in checks["rules"]["detail"]


def test_a_dead_event_fails_with_the_replay_fix(store, fake, healthy):
    queue(store, 5002, status="dead", last_error="amoCRM answered 500")
    code, bad, checks = doctor(store, healthy)
    assert (code, bad) == (ExitCode.UNHEALTHY, {("dead events", "error")})
    assert "amohook events replay --dead" in checks["dead events"]["fix"]
    assert "amohook events list --status dead" in checks["dead events"]["fix"]


def test_a_failed_action_fails_with_its_event_to_replay(store, fake, healthy):
    [event_id] = queue(store, 5003, status="done")
    with store.write():
        Action.create(
            key="k-5003",
            account="example",
            rule="call",
            event_id=event_id,
            kind="create_task",
            status="failed",
            last_error="gave up after 8 attempts: no answer",
        )
    code, bad, checks = doctor(store, healthy)
    assert (code, bad) == (ExitCode.UNHEALTHY, {("failed actions", "error")})
    assert f"amohook events replay {event_id}" in checks["failed actions"]["fix"]


def test_an_event_waiting_long_for_a_worker_warns(store, fake, healthy):
    queue(store, 5004, received_at=time.time() - 3600, next_attempt_at=time.time() - 3600)  # due an hour ago
    code, bad, checks = doctor(store, healthy)
    assert (code, bad) == (ExitCode.DEGRADED, {("pending events", "warning")})
    assert "worker" in checks["pending events"]["fix"]


def test_an_event_in_its_retry_backoff_is_not_waiting(store, fake, healthy):
    queue(store, 5005, received_at=time.time() - 3600, next_attempt_at=time.time() + 600, attempts=3)
    assert doctor(store, healthy)[:2] == (0, set())


def test_a_switched_off_subscription_fails(store, fake, healthy):
    with store.write():
        ReconcileState.update(
            subscription_state="disabled", subscription_note="https://hooks.example.com/webhook/*** stays switched off"
        ).execute()
    code, bad, checks = doctor(store, healthy)
    assert (code, bad) == (ExitCode.UNHEALTHY, {("webhook subscriptions", "error")})
    assert "amohook reconcile --subdomain example" in checks["webhook subscriptions"]["fix"]


def test_reconciliation_far_behind_warns(store, fake, healthy):
    old = time.time() - 7200
    with store.write():
        ReconcileState.update(cursor=int(old), last_pass_at=old).execute()
    code, bad, checks = doctor(store, healthy)
    assert (code, bad) == (ExitCode.DEGRADED, {("reconciliation", "warning")})
    assert "2h ago" in checks["reconciliation"]["detail"]


def test_an_unmigrated_database_fails_alone(store, fake, healthy):
    with store.write():
        SchemaVersion.delete().where(SchemaVersion.version > 1).execute()
    result = run_cli(["doctor", "--rules", healthy["rules"]], store.url)
    assert result.returncode == ExitCode.UNHEALTHY
    assert result.stdout.startswith("✗ database: ")
    assert "schema version 1" in result.stdout and "amohook status" in result.stdout
    assert [line[0] for line in result.stdout.splitlines() if line[:1] in "✓✗!"] == ["✗"]
    assert SchemaVersion.select().where(SchemaVersion.version > 1).count() == 0  # doctor changed nothing


@pytest.mark.parametrize(
    "url", ["postgresql://amohook:pa55word@127.0.0.1:1/amohook", "mysql://amohook:pa55word@127.0.0.1:1/amohook"]
)
def test_an_unreachable_database_is_one_line(url):
    result = run_cli(["doctor"], url)
    assert result.returncode == ExitCode.UNHEALTHY, result.stdout + result.stderr
    first, fix = result.stdout.splitlines()[:2]
    assert first.startswith("✗ database: cannot ") and "***" in first
    assert fix.startswith("    fix: check --db-url")
    assert "pa55word" not in result.stdout + result.stderr
    assert result.stderr == ""


def test_a_missing_sqlite_file_is_reported_not_created(tmp_path):
    path = tmp_path / "nowhere" / "amohook.db"
    result = run_cli(["doctor", "--json"], f"sqlite:///{path}")
    assert result.returncode == ExitCode.UNHEALTHY
    [check] = json.loads(result.stdout)["checks"]
    assert (check["name"], check["ok"]) == ("database", False)
    assert not path.exists() and not path.parent.exists()


def test_little_disk_space_beside_an_sqlite_store_fails(store, fake, healthy, monkeypatch):
    if not store.is_sqlite:
        pytest.skip("disk space is checked beside an SQLite store only")
    from amohook.ops import doctor as doc

    checks = doc.run_checks(store, rules_path=healthy["rules"])
    assert [c.name for c in checks if not c.ok] == []
    monkeypatch.setattr(doc, "DISK_WARN_BYTES", 2**60)  # more than any disk has: real figures, higher bar
    assert [(c.name, c.severity) for c in doc.run_checks(store) if not c.ok] == [("disk space", "warning")]
    monkeypatch.setattr(doc, "DISK_ERROR_BYTES", 2**60)
    [disk] = [c for c in doc.run_checks(store) if not c.ok]
    assert (disk.name, disk.severity) == ("disk space", "error")
    assert "free of" in disk.detail and "amohook prune" in disk.fix


def test_outside_text_is_printed_as_text(store, fake, healthy):
    queue(store, 5006, status="dead", last_error="boom \x1b[31mred\x1b[0m [bold]x[/]")
    result = run_cli(["doctor", "--quiet", "--rules", healthy["rules"]], store.url)
    assert result.returncode == ExitCode.UNHEALTHY
    assert "\x1b" not in result.stdout
    assert "\\x1b[31mred" in result.stdout and "[bold]x[/]" in result.stdout
