"""Refreshes under a slow or strange token endpoint, lost answers, dead lease holders, skewed clocks."""

from __future__ import annotations

import json
import threading
import time

import pytest

from amohook.errors import ExitCode, LockBusy, RefreshOutcomeUnknown
from amohook.store.lease import try_acquire
from amohook.store.models import Account, Lease
from amohook.tokens import refresh_tokens
from tests.conftest import run_cli
from tests.helpers.refresh import make_due, start_cli

DAY = 86400


def status_row(url: str) -> dict:
    result = run_cli(["status", "--json"], url)
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)
    return row


def wait_for_token_request(fake, count: int = 1, limit: float = 20) -> None:
    deadline = time.time() + limit
    while len(fake.requests_to("/oauth2/access_token")) < count and time.time() < deadline:
        time.sleep(0.02)
    assert len(fake.requests_to("/oauth2/access_token")) >= count, "the refresh never reached the token endpoint"


# ---------------------------------------------------------------- finding 7: slow answers, lost answers


@pytest.mark.slow
def test_a_slow_token_answer_is_waited_for_instead_of_losing_the_grant(store, fake, account, monkeypatch):
    # The API's read timeout (20 s; shortened here to keep the test fast) must not apply to the
    # token request: amoCRM spends the old token at once and answers late.
    import amohook.amocrm.http as http

    monkeypatch.setattr(http, "DEFAULT_TIMEOUT", (5.0, 1.0))
    fake.fail("/oauth2/access_token", delay=2.5)
    result = refresh_tokens(store, "example", force=True)
    assert result.outcome == "refreshed"
    stored = Account.get_by_id(account.id)
    assert fake.token_state(stored.refresh_token) == "valid"
    assert stored.refresh_sent_at is None and stored.last_refresh_error is None


@pytest.mark.slow
def test_the_token_request_gives_up_before_the_lease_runs_out(store, fake, account):
    fake.fail("/oauth2/access_token", hang=True)
    started = time.monotonic()
    with pytest.raises(RefreshOutcomeUnknown):
        refresh_tokens(store, "example", force=True, lease_ttl=8)
    elapsed = time.monotonic() - started
    assert 2 < elapsed < 8, f"gave up after {elapsed:.1f} s with an 8 s lease"
    assert Lease.get_by_id("refresh:example").owner is None


def test_status_says_plainly_that_a_refresh_answer_was_lost(store, fake, account):
    fake.fail("/oauth2/access_token", drop=True)
    with pytest.raises(RefreshOutcomeUnknown):
        refresh_tokens(store, "example", force=True)
    warning = status_row(store.url)["warning"]
    assert "a refresh was sent at" in warning and "no usable answer came back" in warning
    assert "if it says revoked, run `amohook init-auth`" in warning
    # The next refresh tells: here amoCRM had spent the token before the connection dropped.
    assert run_cli(["refresh-token", "--force"], store.url).returncode == ExitCode.REAUTH
    warning = status_row(store.url)["warning"]
    assert "no longer valid" in warning and "a refresh was sent" not in warning


def test_a_lost_answer_that_amocrm_never_processed_clears_with_the_next_refresh(store, fake, account):
    fake.fail("/oauth2/access_token", drop=True, after_effect=False)
    with pytest.raises(RefreshOutcomeUnknown):
        refresh_tokens(store, "example", force=True)
    assert "a refresh was sent at" in status_row(store.url)["warning"]
    assert run_cli(["refresh-token", "--force"], store.url).returncode == 0
    assert status_row(store.url)["warning"] is None


def test_after_kill_9_mid_refresh_status_tells_and_the_next_run_does_not_sit_out_the_lease(store, fake, account):
    make_due(account.id)  # so that cron's next plain `refresh-token` wants the lease
    fake.fail("/oauth2/access_token", hang=True)
    proc = start_cli(["refresh-token", "--force"], store.url)
    try:
        wait_for_token_request(fake)
        time.sleep(0.3)
        live = status_row(store.url)["warning"]
        assert "a refresh is in progress" in live, live
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    warning = status_row(store.url)["warning"]
    assert "a refresh was sent at" in warning and "the process ended first" in warning, warning
    started = time.monotonic()
    result = run_cli(["refresh-token"], store.url, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == ExitCode.TEMPORARY, result.stderr
    assert elapsed < 15, f"waited {elapsed:.0f} s for a dead holder's lease"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no longer running" in lines[0] and "held until" in lines[0], result.stderr
    assert fake.refresh_calls == 1


@pytest.mark.slow
def test_a_waiter_says_what_it_waits_for(store, fake, account):
    assert try_acquire("refresh:example", "otherhost:4242:1:abcd", ttl=60)
    heard = []
    with pytest.raises(LockBusy) as info:
        refresh_tokens(store, "example", force=True, lease_wait=3, on_wait=heard.append)
    assert heard and "otherhost:4242" in heard[0] and "until" in heard[0]
    assert "until" in info.value.message
    assert fake.refresh_calls == 0


# ---------------------------------------------------------------- finding 14: a 200 that is not a token


@pytest.mark.parametrize(
    "body, content_type, what",
    [
        ("<html><body>Технические работы</body></html>", "text/html", "HTML page"),
        ({"status": "maintenance"}, "application/json", "no usable access_token"),
        ({"access_token": "", "refresh_token": "x", "expires_in": 86400}, "application/json", "no usable access_token"),
    ],
)
def test_a_200_that_is_not_a_token_is_temporary_recorded_and_keeps_the_pair(
    store, fake, account, body, content_type, what
):
    before = Account.get_by_id(account.id)
    fake.fail("/oauth2/access_token", status=200, body=body, content_type=content_type)
    result = run_cli(["refresh-token", "--force"], store.url)
    assert result.returncode == ExitCode.TEMPORARY, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a token" in lines[0] and what in lines[0], result.stderr
    after = Account.get_by_id(account.id)
    assert (after.access_token, after.refresh_token) == (before.access_token, before.refresh_token)
    warning = status_row(store.url)["warning"]
    assert "a refresh was sent at" in warning and what in warning and "init-auth" in warning


# ---------------------------------------------------------------- finding 8: clocks


def test_a_host_whose_clock_runs_ahead_cannot_take_a_live_lease(store, fake, account):
    # Another host holds the lease (300 s by its clock); this one runs 10 minutes ahead.
    assert try_acquire("refresh:example", "otherhost:4242:1:abcd", ttl=300)
    with pytest.raises(LockBusy):
        refresh_tokens(store, "example", force=True, clock=lambda: time.time() + 600, lease_wait=0.5)
    assert fake.refresh_calls == 0


@pytest.mark.slow
def test_revoked_is_never_reported_for_a_pair_another_process_has_replaced(store, fake, account):
    from amohook.amocrm.http import new_session
    from amohook.amocrm.oauth import Client, refresh_pair

    old = Account.get_by_id(account.id)
    fake.fail("/oauth2/access_token", delay=1.5, after_effect=False)  # ours arrives, is processed late
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(refresh_tokens(store, "example", force=True)))
    worker.start()
    wait_for_token_request(fake)
    # Meanwhile another host spends the same refresh token first and stores its new pair.
    pair = refresh_pair(
        new_session(),
        fake.base_url,
        Client(fake.client_id, fake.client_secret, fake.redirect_uri),
        old.refresh_token,
        subdomain="example",
    )
    Account.update(
        access_token=pair.access_token,
        refresh_token=pair.refresh_token,
        issued_at=pair.issued_at,
        expires_at=pair.expires_at,
    ).where(Account.id == account.id).execute()
    worker.join(30)
    assert [r.outcome for r in outcome] == ["refreshed_by_other"]
    assert [r.status for r in fake.requests_to("/oauth2/access_token")] == [
        401,
        200,
    ]  # ours arrived first, answered last
    row = status_row(store.url)
    assert row["warning"] is None
    assert Account.get_by_id(account.id).refresh_token == pair.refresh_token


def test_a_refresh_under_a_clock_100_days_ahead_uses_amocrms_time_and_warns(store, fake, account):
    ahead = 100 * DAY
    refresh_tokens(store, "example", force=True, clock=lambda: time.time() + ahead)
    stored = Account.get_by_id(account.id)
    assert abs(stored.issued_at - time.time()) < 60
    assert abs(stored.expires_at - (time.time() + DAY)) < 60
    assert abs(stored.clock_skew - ahead) < 60
    row = status_row(store.url)
    assert 0 <= row["refresh_token_age_days"] < 0.01
    assert "100d ahead of amoCRM's" in row["warning"]


def test_without_server_time_the_date_header_anchors_the_expiry(fake):
    from amohook.amocrm.http import new_session
    from amohook.amocrm.oauth import Client, refresh_pair

    body = {"token_type": "Bearer", "expires_in": 86400, "access_token": "a.b.c", "refresh_token": "r"}
    fake.fail("/oauth2/access_token", status=200, body=body, content_type="application/json")
    pair = refresh_pair(
        new_session(),
        fake.base_url,
        Client(fake.client_id, fake.client_secret, fake.redirect_uri),
        "whatever",
        subdomain="example",
        clock=lambda: time.time() - 3 * DAY,
    )
    assert abs(pair.issued_at - time.time()) < 5
    assert abs(pair.clock_skew + 3 * DAY) < 5


def test_a_pair_issued_in_the_future_shows_age_zero_and_a_clock_warning(store, fake, account):
    future = time.time() + 100 * DAY  # as a refresh under a wrong clock left it before this fix
    Account.update(issued_at=future, expires_at=future + DAY).where(Account.id == account.id).execute()
    row = status_row(store.url)
    assert row["refresh_token_age_days"] == 0
    assert "clock is behind" in row["warning"]


def test_a_store_made_before_these_columns_is_upgraded(db_url):
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as run

    from amohook.store import open_store
    from amohook.store.models import SchemaVersion

    store = open_store(db_url)
    migrator = SchemaMigrator.from_database(store.db)
    run(migrator.drop_column("account", "refresh_sent_at"), migrator.drop_column("account", "clock_skew"))
    SchemaVersion.delete().where(SchemaVersion.version >= 2).execute()
    store.close()
    import amohook.store.open as opening

    opening._current = None
    store = open_store(db_url)
    columns = {c.name for c in store.db.get_columns("account")}
    assert {"refresh_sent_at", "clock_skew"} <= columns
    store.close()
