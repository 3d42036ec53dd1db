"""Cron is silent on success, and every failure that needs a person says so with an exit code
that is not 4 ("temporary, cron retries") — #14.6. Each class is produced for real: the fake
amoCRM answering 401/402/403, a store owned by another user, a full disk, real database servers
refusing a login."""

from __future__ import annotations

import os
import subprocess
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

from amohook.errors import ExitCode
from tests.conftest import MYSQL_URL, POSTGRES_URL, _mysql_admin, run_cli
from tests.helpers.refresh import make_due

# What README "Exit codes" documents as needing a person.
PERSON = {ExitCode.USAGE, ExitCode.REAUTH, ExitCode.BLOCKED, ExitCode.UNHEALTHY}


def authorized_store(url: str, fake, *, due: bool) -> None:
    """A store with one account authorized against the fake; ``due``: its refresh is due."""
    import time

    from amohook.amocrm.oauth import Client, TokenPair
    from amohook.store import open_store
    from amohook.tokens import save_authorization

    store = open_store(url)
    access, refresh = fake.issue_tokens()
    issued = time.time() - (13 * 3600 if due else 0)
    save_authorization(
        store,
        subdomain="example",
        base_url=fake.base_url,
        client=Client(fake.client_id, fake.client_secret, fake.redirect_uri),
        pair=TokenPair(access, refresh, 86400, issued),
    )
    if store.is_sqlite:
        store.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_successful_refresh_under_quiet_prints_nothing(store, fake, account):
    make_due(account.id)
    result = run_cli(["refresh-token", "--quiet"], store.url)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert fake.refresh_calls == 1
    loud = run_cli(["refresh-token", "--force"], store.url)  # without --quiet it still says what it did
    assert loud.returncode == 0 and "refreshed" in loud.stdout


@pytest.mark.parametrize(
    "status, body, code, says",
    [
        (402, {"title": "Payment Required", "status": 402, "detail": "Аккаунт не оплачен"}, ExitCode.USAGE, "not paid"),
        (403, {"title": "Forbidden", "status": 403, "detail": "Access denied", "code": 113}, ExitCode.USAGE, "403"),
        (401, {"title": "Unauthorized", "status": 401, "hint": "Token has been revoked"}, ExitCode.REAUTH, "init-auth"),
    ],
    ids=["402-unpaid", "403-forbidden", "401-revoked"],
)
def test_an_answer_only_a_person_can_change_is_never_exit_4(sqlite_url, fake, status, body, code, says):
    authorized_store(sqlite_url, fake, due=True)
    fake.fail("/oauth2/access_token", status=status, body=body, times=None)
    result = run_cli(["refresh-token", "--quiet"], sqlite_url)
    assert result.returncode == code, result.stderr
    assert code in PERSON
    assert says in one_line(result)
    assert result.stdout == ""


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_passing_trouble_stays_exit_4(sqlite_url, fake, status):
    authorized_store(sqlite_url, fake, due=True)
    fake.fail("/oauth2/access_token", status=status, times=None)
    result = run_cli(["refresh-token", "--quiet"], sqlite_url)
    assert result.returncode == ExitCode.TEMPORARY, result.stderr


def mount_tmpfs(where, size: str = "2m") -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to mount a small file system")
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")


def test_a_store_on_a_read_only_file_system_is_exit_2_and_names_the_fix(fake, tmp_path):
    """systemd's ProtectSystem=strict without write access to the store, or a remount read-only."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk)
    try:
        url = f"sqlite:///{disk}/amohook.db"
        authorized_store(url, fake, due=True)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = run_cli(["refresh-token", "--quiet"], url)
        assert result.returncode == ExitCode.USAGE, result.stderr
        line = one_line(result)
        assert "read-only file system" in line and "ReadWritePaths=" in line
        assert fake.refresh_calls == 0
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_exit_2_and_sends_no_refresh(fake, tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk)
    try:
        url = f"sqlite:///{disk}/amohook.db"
        authorized_store(url, fake, due=True)
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        result = run_cli(["refresh-token", "--quiet"], url)
        assert result.returncode == ExitCode.USAGE, result.stderr
        assert "disk is full" in one_line(result)
        assert fake.refresh_calls == 0  # the token was not spent on a pair that could not be stored
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_database_reached_but_refusing_the_login_is_exit_2_without_the_password():
    if not MYSQL_URL:
        pytest.skip("AMOHOOK_TEST_MYSQL_URL is not set")
    user, name = f"amohook_pw_{uuid.uuid4().hex[:6]}", f"amohook_test_{uuid.uuid4().hex[:10]}"
    admin = _mysql_admin(MYSQL_URL)
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
        cur.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'right-one'")
        cur.execute(f"GRANT ALL ON {name}.* TO '{user}'@'%'")
    try:
        netloc = urlsplit(MYSQL_URL).netloc.rsplit("@", 1)[-1]
        url = urlunsplit(("mysql", f"{user}:wrong-one@{netloc}", f"/{name}", "", ""))
        result = run_cli(["status"], url)
        assert result.returncode == ExitCode.USAGE, result.stderr
        line = one_line(result)
        assert "refused the login" in line and user in line and "wrong-one" not in line
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP USER '{user}'@'%'")
            cur.execute(f"DROP DATABASE {name}")
        admin.close()


def test_a_postgresql_role_that_does_not_exist_is_exit_2():
    if not POSTGRES_URL:
        pytest.skip("AMOHOOK_TEST_POSTGRES_URL is not set")
    netloc = urlsplit(POSTGRES_URL).netloc.rsplit("@", 1)[-1]
    url = urlunsplit(("postgresql", f"nobody_{uuid.uuid4().hex[:6]}:secret-pw@{netloc}", "/postgres", "", ""))
    result = run_cli(["status"], url)
    assert result.returncode == ExitCode.USAGE, result.stderr
    line = one_line(result)
    assert "refused the login" in line and "secret-pw" not in line


def test_a_database_server_that_is_down_stays_exit_4():
    result = run_cli(["status"], "mysql://amohook:pw@127.0.0.1:1/amohook")
    assert result.returncode == ExitCode.TEMPORARY, result.stderr
