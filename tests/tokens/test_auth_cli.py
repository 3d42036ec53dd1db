"""init-auth, auth-url, status and refresh-token through the real CLI against the fake amoCRM."""

from __future__ import annotations

import json
import time

import pytest

from amohook.errors import ExitCode
from amohook.store import open_store
from amohook.store.models import Account
from tests.conftest import cli_env, run_cli
from tests.helpers.e2e import init_args


def init_env(db_url, fake, **extra):
    return cli_env(db_url, AMOHOOK_CLIENT_SECRET=fake.client_secret, **extra)


def assert_one_line_error(result, *needles):
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_no_secrets(result, fake, *tokens):
    text = result.stdout + result.stderr
    assert fake.client_secret not in text
    for token in tokens:
        if token:
            assert token not in text


def test_init_auth_exchanges_code_stores_pair_and_records_account_id(db_url, fake):
    code = fake.issue_code()
    result = run_cli(init_args(fake, code), db_url, env=init_env(db_url, fake))
    assert result.returncode == 0, result.stderr
    assert "authorized example" in result.stdout
    store = open_store(db_url)
    account = Account.get(Account.subdomain == "example")
    assert account.amo_account_id == fake.account_id
    assert account.timezone == fake.timezone
    assert len(account.access_token) > 255 and len(account.refresh_token) > 255  # TEXT columns
    assert fake.token_state(account.access_token) == "valid"
    assert account.expires_at - account.issued_at == pytest.approx(fake.access_ttl)
    assert_no_secrets(result, fake, account.access_token, account.refresh_token, code)
    # The token was proved with GET /api/v4/account.
    assert fake.requests_to("/api/v4/account")
    store.close()


@pytest.mark.parametrize(
    "setup, needles",
    [
        ("expired", ["codes live 20 minutes", "Keys"]),
        ("used", ["already used"]),
        ("garbage", ["cannot read this authorization code"]),
        ("redirect", ["redirect URI", "https://wrong.example.com/cb"]),
        ("secret", ["client id or client secret"]),
    ],
)
def test_init_auth_explains_each_refusal_in_one_line(sqlite_url, fake, setup, needles):
    code = fake.issue_code(ttl=0.01 if setup == "expired" else None)
    args = init_args(fake, code)
    env = init_env(sqlite_url, fake)
    if setup == "expired":
        time.sleep(0.05)
    elif setup == "used":
        assert run_cli(args, sqlite_url, env=env).returncode == 0
    elif setup == "garbage":
        args[-1] = "not-a-code"
    elif setup == "redirect":
        args[args.index("--redirect-uri") + 1] = "https://wrong.example.com/cb"
    elif setup == "secret":
        env["AMOHOOK_CLIENT_SECRET"] = "wrong-secret"
    result = run_cli(args, sqlite_url, env=env)
    assert result.returncode == ExitCode.USAGE
    assert_one_line_error(result, *needles)
    assert_no_secrets(result, fake, code if setup != "garbage" else None)


def test_init_auth_without_secret_and_without_terminal_says_how_to_give_it(sqlite_url, fake):
    env = cli_env(sqlite_url)
    result = run_cli(init_args(fake, fake.issue_code()), sqlite_url, env=env)
    assert result.returncode == ExitCode.USAGE
    assert_one_line_error(result, "AMOHOOK_CLIENT_SECRET")


def test_init_auth_missing_options_named(sqlite_url, fake):
    result = run_cli(["init-auth", "--subdomain", "example"], sqlite_url, env=init_env(sqlite_url, fake))
    assert result.returncode == ExitCode.USAGE
    assert_one_line_error(result, "--code", "--client-id", "--redirect-uri")


def test_long_lived_token_from_environment_is_stored_and_never_refreshed(sqlite_url, fake):
    token = fake.issue_long_lived_token(expires_in=365 * 86400)
    env = cli_env(sqlite_url, AMOHOOK_LONG_LIVED_TOKEN=token)
    result = run_cli(["init-auth", "--subdomain", "example", "--base-url", fake.base_url], sqlite_url, env=env)
    assert result.returncode == 0, result.stderr
    assert token not in result.stdout + result.stderr
    store = open_store(sqlite_url)
    account = Account.get(Account.subdomain == "example")
    assert account.long_lived and account.refresh_token is None
    assert account.expires_at == pytest.approx(time.time() + 365 * 86400, abs=120)
    store.close()
    result = run_cli(["refresh-token", "--force"], sqlite_url)
    assert result.returncode == 0
    assert "long-lived" in result.stdout
    assert fake.refresh_calls == 0


def test_rejected_long_lived_token_is_an_error_and_not_kept(sqlite_url, fake):
    env = cli_env(sqlite_url, AMOHOOK_LONG_LIVED_TOKEN="a.b.c")
    result = run_cli(["init-auth", "--subdomain", "example", "--base-url", fake.base_url], sqlite_url, env=env)
    assert result.returncode == ExitCode.USAGE
    assert_one_line_error(result, "rejected this long-lived token")


def test_status_json_reports_times_without_secrets(sqlite_url, fake):
    code = fake.issue_code()
    assert run_cli(init_args(fake, code), sqlite_url, env=init_env(sqlite_url, fake)).returncode == 0
    result = run_cli(["status", "--json"], sqlite_url)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 1
    row = rows[0]
    assert row["subdomain"] == "example" and row["has_tokens"] is True and row["account_id"] == fake.account_id
    assert row["expires_at"] and row["refresh_due_at"] and row["warning"] is None
    assert row["refresh_token_age_days"] < 0.01
    store = open_store(sqlite_url)
    account = Account.get()
    assert_no_secrets(result, fake, account.access_token, account.refresh_token)
    table = run_cli(["status"], sqlite_url)
    assert table.returncode == 0 and "example" in table.stdout
    assert_no_secrets(table, fake, account.access_token, account.refresh_token)
    store.close()


def test_status_warns_well_before_the_refresh_token_dies(sqlite_url, fake):
    code = fake.issue_code()
    assert run_cli(init_args(fake, code), sqlite_url, env=init_env(sqlite_url, fake)).returncode == 0
    store = open_store(sqlite_url)
    long_ago = time.time() - 70 * 86400
    Account.update(issued_at=long_ago, expires_at=long_ago + 86400).execute()
    store.close()
    rows = json.loads(run_cli(["status", "--json"], sqlite_url).stdout)
    assert "70d old" in rows[0]["warning"] and "3 months" in rows[0]["warning"]


def test_status_with_empty_store_tells_what_to_do(sqlite_url):
    from amohook.store import open_store

    open_store(sqlite_url).close()
    result = run_cli(["status"], sqlite_url)
    assert result.returncode == 0
    assert "init-auth" in result.stdout


def test_auth_url_remembers_a_random_state(sqlite_url, fake):
    env = init_env(sqlite_url, fake)
    args = ["auth-url", "--client-id", fake.client_id, "--redirect-uri", fake.redirect_uri]
    first = run_cli(args, sqlite_url, env=env)
    second = run_cli(args, sqlite_url, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("https://www.amocrm.ru/oauth?client_id=client-id-123&state=")
    assert first.stdout != second.stdout
    assert fake.client_secret not in first.stdout
    from amohook.store.models import OAuthState

    store = open_store(sqlite_url)
    states = {s.state for s in OAuthState.select()}
    assert len(states) == 2 and all(s in first.stdout + second.stdout for s in states)
    store.close()


def test_bad_database_url_is_a_usage_error(fake):
    result = run_cli(["status"], "ftp://nowhere")
    assert result.returncode == ExitCode.USAGE
    assert_one_line_error(result, "unsupported database URL")


def test_unreachable_database_is_a_temporary_error_without_password():
    result = run_cli(["status"], "postgresql://someone:hunter2@127.0.0.1:1/nothing")
    assert result.returncode == ExitCode.TEMPORARY
    assert "hunter2" not in result.stderr
    assert_one_line_error(result, "database")


def test_traceback_flag_shows_the_stack(sqlite_url):
    from amohook.store import open_store

    open_store(sqlite_url).close()
    result = run_cli(["--traceback", "refresh-token"], sqlite_url)
    assert result.returncode == ExitCode.USAGE
    assert "Traceback" in result.stderr and "AccountNotFound" in result.stderr


def test_completed_authorization_keeps_no_client_secret(sqlite_url, fake):
    from amohook.amocrm.oauth import Client
    from amohook.auth import complete_authorization, start_authorization
    from amohook.store.models import OAuthState

    store = open_store(sqlite_url)
    client = Client(fake.client_id, fake.client_secret, fake.redirect_uri)
    _, state = start_authorization(store, client=client, base_url=fake.base_url)
    account = complete_authorization(store, state=state, code=fake.issue_code(), referer="example.amocrm.ru")
    assert account.amo_account_id == fake.account_id
    row = OAuthState.get_by_id(state)
    assert row.used_at is not None and row.client_secret == ""
    # Started long ago and never completed: removed (with its secret) when the next one starts.
    OAuthState.create(state="stale", client_id="c", client_secret="s", redirect_uri="r", created_at=time.time() - 7200)
    start_authorization(store, client=client)
    assert OAuthState.get_or_none(OAuthState.state == "stale") is None
    store.close()


def run_in_terminal(args: list[str], env: dict, answers: list[str], timeout: float = 30) -> tuple[int, str]:
    """Run the real CLI on a pseudo-terminal (its controlling terminal, as in an ssh session),
    answering each prompt in turn; returns the exit code and everything the terminal showed."""
    import fcntl
    import os
    import select
    import subprocess
    import sys
    import termios

    from tests.conftest import ROOT

    leader, follower = os.openpty()

    def become_terminal_owner():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "amohook", *args],
        env=env,
        cwd=str(ROOT),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        preexec_fn=become_terminal_owner,
    )
    os.close(follower)
    shown, pending = b"", list(answers)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
            if pending and shown.rstrip().endswith(b":"):
                # A hidden prompt turns echo off (and flushes input) after printing itself: answer
                # only once it has, or the answer is echoed and then thrown away.
                while termios.tcgetattr(leader)[3] & termios.ECHO and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.write(leader, pending.pop(0).encode() + b"\n")
        elif proc.poll() is not None:
            break
    os.close(leader)
    return proc.wait(timeout=10), shown.decode(errors="replace")


def test_init_auth_asks_for_the_code_at_a_hidden_prompt_in_a_terminal(sqlite_url, fake):
    code = fake.issue_code()
    args = [a for a in init_args(fake, code) if a not in ("--code", code)]
    status, shown = run_in_terminal(args, init_env(sqlite_url, fake), [code])
    assert status == 0, shown
    assert "Authorization code" in shown and "authorized example" in shown
    assert code not in shown  # not echoed
    store = open_store(sqlite_url)
    assert fake.token_state(Account.get(Account.subdomain == "example").access_token) == "valid"
    store.close()


def test_init_auth_takes_the_code_from_the_environment_without_a_terminal(sqlite_url, fake):
    code = fake.issue_code()
    args = [a for a in init_args(fake, code) if a not in ("--code", code)]
    result = run_cli(args, sqlite_url, env=init_env(sqlite_url, fake, AMOHOOK_AUTH_CODE=code))
    assert result.returncode == 0, result.stderr
    assert_no_secrets(result, fake, code)
    without = run_cli(args, sqlite_url, env=init_env(sqlite_url, fake))
    assert without.returncode == ExitCode.USAGE
    assert_one_line_error(without, "--code (or AMOHOOK_AUTH_CODE)")


def test_init_auth_points_at_the_readme_for_renewal_not_at_the_service_crontab(sqlite_url, fake):
    """crontab.example is the service's (STATE_DIRECTORY=/var/lib/amohook, /opt/amohook): a quick
    start that installed it as its own crontab would renew another store, or none. The success line
    names the README section that has both the timers and the cron lines, and that section exists."""
    from tests.conftest import ROOT

    result = run_cli(init_args(fake, fake.issue_code()), sqlite_url, env=init_env(sqlite_url, fake))
    assert result.returncode == 0, result.stderr
    assert "crontab.example" not in result.stdout
    section = "From the quick start to a service"
    assert f'"{section}"' in result.stdout and "refresh-token" in result.stdout
    assert f"\n## {section}\n" in (ROOT / "README.md").read_text(encoding="utf-8")
