"""Where the store is (#14.3): an SQLite path is absolute or refused, and only the commands that
start a store make one — the rest say where they looked, so cron (cwd $HOME) and systemd
(WorkingDirectory=) can never end up on two different stores without anyone noticing."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading

import pytest

from amohook.errors import ExitCode
from tests.conftest import cli_env, run_cli

# Every command that reads or changes an existing store, with the arguments it needs to get as
# far as opening it. None may create one.
NEEDS_A_STORE = [
    ["status"],
    ["status", "--json"],
    ["refresh-token", "--quiet"],
    ["pipelines"],
    ["task-types"],
    ["users", "--json"],
    ["sync-entities", "--quiet"],
    ["events", "list"],
    ["events", "show", "1"],
    ["events", "replay", "1"],
    ["rules", "check", "--rules", "RULES"],
    ["reconcile"],
    ["webhooks", "list"],
    ["prune"],
]


def in_dir(cwd, args: list[str], db_url: str, **env: str) -> subprocess.CompletedProcess:
    """The real CLI in a process of its own started in ``cwd`` (relative paths resolve there)."""
    return subprocess.run(
        [sys.executable, "-m", "amohook", *args],
        env=cli_env(db_url, **env),
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(result, code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# -- relative SQLite paths -----------------------------------------------------------------------
@pytest.mark.parametrize("args", [["status"], ["init-auth", "--subdomain", "x"], ["serve"], ["refresh-token", "-q"]])
def test_a_relative_sqlite_path_is_refused_with_the_absolute_urls_it_could_mean(tmp_path, args):
    line = one_line(in_dir(tmp_path, args, "sqlite:///tmp/x.db"), ExitCode.USAGE)
    assert "relative path 'tmp/x.db'" in line
    assert "sqlite:////tmp/x.db if you meant /tmp/x.db" in line
    assert f"sqlite:///{tmp_path}/tmp/x.db for the file under the current directory" in line
    assert list(tmp_path.iterdir()) == []  # no ./tmp/x.db, no directory


@pytest.mark.parametrize("url", ["sqlite://x.db", "sqlite:///./data/x.db", "sqlite:///../x.db"])
def test_other_relative_forms_are_refused_too(tmp_path, url):
    work = tmp_path / "work"
    work.mkdir()
    line = one_line(in_dir(work, ["status"], url), ExitCode.USAGE)
    assert "relative path" in line and "sqlite:////" in line
    assert list(tmp_path.rglob("*.db")) == []


def test_an_absolute_path_and_a_home_path_are_taken(tmp_path):
    from amohook.dburl import sqlite_path

    assert str(sqlite_path(f"sqlite:///{tmp_path}/a.db")) == f"{tmp_path}/a.db"
    assert sqlite_path("sqlite:///~/a.db").is_absolute()


def test_a_relative_data_directory_is_refused_and_a_relative_xdg_one_ignored(tmp_path):
    from amohook.errors import ConfigError
    from amohook.settings import data_dir

    with pytest.raises(ConfigError, match="AMOHOOK_DATA_DIR 'data' is a relative path"):
        data_dir({"AMOHOOK_DATA_DIR": "data"})
    assert data_dir({"XDG_DATA_HOME": "rel", "HOME": str(tmp_path)}).is_absolute()


# -- commands that need a store never make one -----------------------------------------------------
@pytest.mark.parametrize("args", NEEDS_A_STORE, ids=" ".join)
def test_a_command_that_needs_a_store_says_where_it_looked_and_makes_none(tmp_path, args):
    rules = tmp_path / "rules.toml"
    rules.write_text("")
    db = tmp_path / "state" / "amohook.db"
    args = [str(rules) if a == "RULES" else a for a in args]
    result = run_cli(args, f"sqlite:///{db}")
    line = one_line(result, ExitCode.USAGE)
    assert f"no amohook store at {db} — run `amohook init-auth` first" in line
    assert result.stdout == ""
    assert not (tmp_path / "state").exists()


def test_doctor_reports_a_missing_store_with_its_own_exit_code_and_makes_none(tmp_path):
    db = tmp_path / "amohook.db"
    result = run_cli(["doctor"], f"sqlite:///{db}")
    assert result.returncode == ExitCode.UNHEALTHY, result.stdout + result.stderr
    assert result.stdout.startswith(f"✗ database: no amohook store at {db}")
    assert "fix: run `amohook init-auth` first" in result.stdout
    assert not db.exists()


def test_a_server_database_without_amohook_tables_is_no_store_and_gets_none(db_url):
    """MySQL/PostgreSQL: the database exists (the admin made it) but amohook never set it up."""
    from amohook.store.db import connect_url

    line = one_line(run_cli(["status"], db_url), ExitCode.USAGE)
    assert "no amohook store at" in line and "init-auth" in line
    if db_url.startswith("sqlite"):
        assert not os.path.exists(db_url[len("sqlite:///") :])
        return
    db = connect_url(db_url)
    try:
        found = {name for (name,) in db.execute_sql(_TABLES[db_url.split(":")[0]]).fetchall()}
    finally:
        db.close()
    assert found == set(), found
    doctor = run_cli(["doctor"], db_url)
    assert doctor.returncode == ExitCode.UNHEALTHY and "no amohook store at" in doctor.stdout


_TABLES = {
    "mysql": "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()",
    "postgresql": "SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = current_schema()",
}


def test_the_commands_that_start_a_store_make_it(tmp_path, fake):
    db = tmp_path / "new" / "amohook.db"
    env = cli_env(f"sqlite:///{db}", AMOHOOK_CLIENT_SECRET=fake.client_secret)
    result = run_cli(
        ["auth-url", "--client-id", fake.client_id, "--redirect-uri", fake.redirect_uri], f"sqlite:///{db}", env=env
    )
    assert result.returncode == 0, result.stderr
    assert db.exists() and db.stat().st_size > 0
    assert run_cli(["status", "--json"], f"sqlite:///{db}").stdout.strip() == "[]"


# -- files that are not amohook's stores are refused untouched ------------------------------------
@pytest.mark.parametrize("args", [["status"], ["auth-url", "--client-id", "i", "--redirect-uri", "https://x/cb"]])
def test_an_empty_file_is_refused_and_left_empty(tmp_path, args):
    db = tmp_path / "amohook.db"
    db.touch(mode=0o600)
    line = one_line(run_cli(args, f"sqlite:///{db}", env=cli_env(f"sqlite:///{db}", AMOHOOK_CLIENT_SECRET="s")), 2)
    assert "is an empty file, not an amohook SQLite store" in line and "nothing was changed" in line
    assert db.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["amohook.db"]


@pytest.mark.parametrize("args", [["status"], ["refresh-token", "-q"], ["init-auth", "--subdomain", "x"]])
def test_another_programs_sqlite_database_is_refused_before_anything_changes_it(tmp_path, args):
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.execute("INSERT INTO notes (body) VALUES ('keep me')")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    env = cli_env(f"sqlite:///{db}", AMOHOOK_LONG_LIVED_TOKEN="t")
    line = one_line(run_cli(args, f"sqlite:///{db}", env=env), ExitCode.USAGE)
    assert "another program's SQLite database" in line and "nothing was changed" in line
    assert db.read_bytes() == before  # not switched to WAL (which rewrites the header), no table added
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]  # no -wal, no -shm


def test_an_sqlite_database_without_tables_is_no_store_until_a_start_makes_it_one(tmp_path):
    from amohook.store import open_store

    db = tmp_path / "amohook.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 0")
    conn.execute("VACUUM")
    conn.close()
    assert db.stat().st_size > 0
    assert "no amohook store at" in one_line(run_cli(["status"], f"sqlite:///{db}"), ExitCode.USAGE)
    open_store(f"sqlite:///{db}").close()
    assert run_cli(["status", "--json"], f"sqlite:///{db}").returncode == 0


def test_many_threads_making_one_new_store_all_get_it_and_leave_no_temporary_file(tmp_path):
    from amohook.store.db import _prepare_sqlite_file

    db = tmp_path / "amohook.db"
    errors: list[BaseException] = []

    def make() -> None:
        try:
            _prepare_sqlite_file(db)
        except BaseException as exc:  # noqa: BLE001 — collected and shown by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["amohook.db"]
    assert db.read_bytes()[:16] == b"SQLite format 3\x00"
    assert oct(db.stat().st_mode & 0o777) == "0o600"
