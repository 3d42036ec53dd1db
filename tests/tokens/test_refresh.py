"""refresh-token: due logic, single-use refresh tokens, and real concurrent processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from amohook.amocrm.client import AmoClient
from amohook.errors import ExitCode, LockBusy, RefreshOutcomeUnknown
from amohook.store import open_store
from amohook.store.lease import try_acquire
from amohook.store.models import Account, Lease
from amohook.tokens import refresh_tokens
from tests.conftest import ROOT, cli_env, run_cli
from tests.helpers.refresh import make_due, start_cli


def test_not_due_exits_zero_with_a_short_line_and_sends_nothing(store, fake, account):
    result = run_cli(["refresh-token"], store.url)
    assert result.returncode == 0, result.stderr
    assert "not due" in result.stdout
    assert fake.refresh_calls == 0
    quiet = run_cli(["refresh-token", "--quiet"], store.url)
    assert quiet.returncode == 0 and quiet.stdout == ""


def test_due_pair_is_refreshed_and_the_new_pair_works(store, fake, account):
    make_due(account.id)
    old_refresh = account.refresh_token
    result = refresh_tokens(store, "example")
    assert result.outcome == "refreshed"
    fresh = Account.get_by_id(account.id)
    assert fresh.refresh_token != old_refresh
    assert fake.token_state(old_refresh) == "used"
    assert fake.token_state(fresh.refresh_token) == "valid"
    assert fresh.expires_at > time.time() + 86000
    assert AmoClient(store, "example").account_info()["id"] == fake.account_id


@pytest.mark.slow
def test_eight_processes_when_due_make_exactly_one_refresh_call(store, fake, account):
    make_due(account.id)
    procs = [start_cli(["refresh-token"], store.url) for _ in range(8)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    assert fake.refresh_calls == 1
    assert sum(out.startswith("example: refreshed;") for out, _ in outs) == 1
    fresh = Account.get_by_id(account.id)
    assert fake.token_state(fresh.refresh_token) == "valid"
    assert AmoClient(store, "example").account_info()["id"] == fake.account_id


@pytest.mark.slow
def test_eight_forced_processes_refresh_one_after_another_without_revocation(store, fake, account):
    procs = [start_cli(["refresh-token", "--force"], store.url) for _ in range(8)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "revoked" not in (out + err).lower()
    assert fake.refresh_calls == 8
    token_requests = fake.requests_to("/oauth2/access_token")
    assert [r.status for r in token_requests] == [200] * 8
    # Each request spent the refresh token the previous one received: a single unbroken chain.
    spent = [r.json["refresh_token"] for r in token_requests]
    assert len(set(spent)) == 8
    fresh = Account.get_by_id(account.id)
    assert fake.token_state(fresh.refresh_token) == "valid"


@pytest.mark.slow
@pytest.mark.alone
def test_store_stays_writable_while_a_refresh_waits_on_a_slow_token_endpoint(store, fake, account):
    fake.fail("/oauth2/access_token", delay=5.0)
    proc = start_cli(["refresh-token", "--force"], store.url)
    deadline = time.time() + 20
    while not fake.requests_to("/oauth2/access_token") and time.time() < deadline:
        time.sleep(0.02)
    assert fake.requests_to("/oauth2/access_token"), "the refresh never reached the token endpoint"
    # Another process commits a write while the refresh is waiting for amoCRM.
    writer = subprocess.run(
        [sys.executable, "-c", WRITE_ONCE, store.url],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(ROOT),
    )
    assert writer.returncode == 0, writer.stderr
    elapsed = float(writer.stdout.strip())
    assert elapsed < 0.5, f"a write waited {elapsed:.2f} s behind the refresh"
    assert proc.poll() is None, "the refresh should still be waiting on the slow endpoint"
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


WRITE_ONCE = """
import sys, time
from amohook.store import open_store
from amohook.store.models import OAuthState
store = open_store(sys.argv[1])
start = time.monotonic()
with store.write():
    OAuthState.create(state="probe", client_id="c", client_secret="s", redirect_uri="r")
print(time.monotonic() - start)
"""


def test_revoked_refresh_token_has_its_own_exit_code_and_says_init_auth(store, fake, account):
    fake.revoke_all()
    result = run_cli(["refresh-token", "--force"], store.url)
    assert result.returncode == ExitCode.REAUTH
    assert "init-auth" in result.stderr and "Traceback" not in result.stderr
    assert account.refresh_token not in result.stderr


def test_lost_answer_is_not_resent_and_is_explained(store, fake, account):
    fake.fail("/oauth2/access_token", drop=True)
    with pytest.raises(RefreshOutcomeUnknown) as info:
        refresh_tokens(store, "example", force=True)
    assert fake.refresh_calls == 1
    assert "did not send it again" in info.value.message
    assert Account.get_by_id(account.id).last_refresh_error
    # And on the command line: a temporary failure, one line.
    fake.fail("/oauth2/access_token", drop=True)
    result = run_cli(["refresh-token", "--force"], store.url)
    assert result.returncode == ExitCode.TEMPORARY
    assert "no answer came back" in result.stderr
    assert fake.refresh_calls == 2


def test_amocrm_5xx_on_refresh_is_temporary(store, fake, account):
    fake.fail("/oauth2/access_token", status=502)
    result = run_cli(["refresh-token", "--force"], store.url)
    assert result.returncode == ExitCode.TEMPORARY
    assert fake.refresh_calls == 1


def test_unreachable_amocrm_is_temporary_and_keeps_the_pair(store, fake, account):
    before = Account.get_by_id(account.id).refresh_token
    Account.update(base_url="http://127.0.0.1:1").where(Account.id == account.id).execute()
    result = run_cli(["refresh-token", "--force"], store.url)
    assert result.returncode == ExitCode.TEMPORARY
    assert "nothing was sent" in result.stderr
    assert Account.get_by_id(account.id).refresh_token == before


@pytest.mark.slow
def test_a_dead_holders_lease_runs_out_and_the_refresh_proceeds(store, fake, account):
    make_due(account.id)
    assert try_acquire("refresh:example", "dead-process", ttl=1.0)
    started = time.monotonic()
    result = refresh_tokens(store, "example", lease_wait=10)
    assert result.outcome == "refreshed"
    assert 0.5 < time.monotonic() - started < 8
    assert Lease.get_by_id("refresh:example").owner is None


def test_a_live_holder_makes_a_waiter_give_up_with_a_temporary_error(store, fake, account):
    make_due(account.id)
    assert try_acquire("refresh:example", "busy-process", ttl=60)
    with pytest.raises(LockBusy):
        refresh_tokens(store, "example", lease_wait=0.3)
    assert fake.refresh_calls == 0


def test_client_refreshes_once_on_401_and_repeats(store, fake, account):
    fake.expire_access_tokens()
    client = AmoClient(store, "example")
    assert client.account_info()["id"] == fake.account_id
    assert fake.refresh_calls == 1
    assert [r.status for r in fake.requests_to("/api/v4/account")] == [401, 200]


def test_threads_hitting_401_together_refresh_once(store, fake, account):
    fake.expire_access_tokens()
    errors = []

    def call():
        try:
            AmoClient(open_store(store.url), "example").account_info()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert fake.refresh_calls == 1


def test_migrations_are_idempotent_and_recorded(db_url):
    from amohook.store.migrations import LATEST, MIGRATIONS, current_version, migrate
    from amohook.store.models import SchemaVersion

    store = open_store(db_url)
    assert current_version(store) == LATEST
    assert migrate(store) == LATEST
    store.close()
    store = open_store(db_url)
    assert [v.version for v in SchemaVersion.select().order_by(SchemaVersion.version)] == [v for v, _ in MIGRATIONS]
    store.close()


@pytest.mark.slow
def test_many_processes_creating_the_schema_at_once_agree(db_url):
    # As serve and worker starting together on a new store (only the commands that start a store make it).
    start = "import sys; from amohook.store import open_store; open_store(sys.argv[1]); print('[]')"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", start, db_url],
            env=cli_env(db_url),
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.strip() == "[]"
    assert run_cli(["status", "--json"], db_url).stdout.strip() == "[]"


def test_sqlite_file_and_directory_are_private(tmp_path):
    import stat

    env = cli_env("unused")
    env.pop("AMOHOOK_DB_URL")
    env["AMOHOOK_DATA_DIR"] = str(tmp_path / "data")
    env["AMOHOOK_CLIENT_SECRET"] = "secret"
    args = ["auth-url", "--client-id", "id", "--redirect-uri", "https://example.org/oauth/callback"]  # makes a store
    result = subprocess.run(
        [sys.executable, "-m", "amohook", *args], env=env, capture_output=True, text=True, cwd=str(ROOT), timeout=60
    )
    assert result.returncode == 0, result.stderr
    directory = tmp_path / "data"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "amohook.db").stat().st_mode) == 0o600


def test_a_revoked_grant_shows_in_status_at_once(store, fake, account):
    import json as _json

    fake.revoke_all()
    assert run_cli(["refresh-token", "--force"], store.url).returncode == ExitCode.REAUTH
    [row] = _json.loads(run_cli(["status", "--json"], store.url).stdout)
    assert "init-auth" in row["warning"] and "no longer valid" in row["warning"]


def test_token_pairs_do_not_show_their_tokens():
    from amohook.amocrm.oauth import TokenPair

    pair = TokenPair("access-secret-value", "refresh-secret-value", 86400, 0.0)
    assert "secret-value" not in repr(pair)
