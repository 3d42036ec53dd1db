"""A store is trusted by what it holds, not by its version number alone; a missing database is a
setup step for a person. Both are exit 2 with the fix, never "temporary" (exit 4).

The odd stores are built the way they arose: today's schema made by the migrations, then cut back
to the shape of a store from an unreleased commit (a version recorded whose columns are missing,
an older version with later columns already there), a newer amohook's store, and a database that
holds someone else's tables. Each is then opened by the real CLI.
"""

from __future__ import annotations

import os
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

from amohook.errors import ExitCode
from tests.conftest import MYSQL_URL, POSTGRES_URL, cli_env, run_cli

REFRESH_COLUMNS = [("account", "refresh_sent_at"), ("account", "clock_skew")]
# Version 3 today; at an intermediate commit of main, version 2 made exactly this.
RECONCILIATION_TABLES = ["change_seen", "reconcile_state", "subscription"]


def build(url: str, *, versions, drop_columns=(), drop_tables=(), extra_versions=(), retype=()):
    """A store made by today's migrations, then given the recorded ``versions`` and without
    ``drop_columns`` / ``drop_tables``, with the (table, column, field) of ``retype`` changed; one
    account and one event in it. Built on a connection of its own, so the CLI opens it afresh."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as run

    from amohook.store import models
    from amohook.store.db import Store, connect_url
    from amohook.store.migrations import migrate

    db = connect_url(url)
    with db.bind_ctx(models.ALL_MODELS):
        migrate(Store(db, url))
        models.Account.create(subdomain="example", base_url="https://example.amocrm.ru", client_secret="s3cret-value")
        models.Event.create(delivery_id=1, idx=0, entity="leads", action="status")
        models.SchemaVersion.delete().where(models.SchemaVersion.version.not_in(list(versions))).execute()
        for version in extra_versions:
            models.SchemaVersion.create(version=version)
        migrator = SchemaMigrator.from_database(db)
        if drop_columns:
            run(*[migrator.drop_column(table, column) for table, column in drop_columns])
        for table, column, field in retype:
            cast = {"cast": f"{column}::{field.field_type}"} if url.startswith("postgres") else {}
            run(migrator.alter_column_type(table, column, field, **cast))
        for table in drop_tables:
            db.execute_sql(f"DROP TABLE {table}")
    db.close()


def recorded_versions() -> list[int]:
    """The versions a store made by today's migrations records (a number may be skipped)."""
    from amohook.store.migrations import MIGRATIONS

    return [version for version, _ in MIGRATIONS]


def holds(url: str):
    """(versions, {table: columns}, account subdomains) as they are now, read on a connection of its own."""
    from amohook.store import models
    from amohook.store.db import connect_url

    db = connect_url(url)
    try:
        with db.bind_ctx(models.ALL_MODELS):
            versions = [v.version for v in models.SchemaVersion.select().order_by(models.SchemaVersion.version)]
            accounts = [a for (a,) in db.execute_sql("SELECT subdomain FROM account").fetchall()]
    finally:
        db.close()
    return versions, tables_of(url), accounts


def tables_of(url: str) -> dict[str, set[str]]:
    """{table: column names} of the database at ``url``."""
    from amohook.store.db import connect_url

    db = connect_url(url)
    try:
        return {t: {c.name for c in db.get_columns(t)} for t in db.get_tables()}
    finally:
        db.close()


def refused(result, *says: str) -> str:
    """The command failed with exit 2 in one line that says each of ``says``; that line."""
    assert result.returncode == ExitCode.USAGE, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "try again" not in result.stderr
    for text in says:
        assert text in lines[0], lines[0]
    return lines[0]


def test_a_store_claiming_the_current_version_without_its_columns_is_refused_and_kept(db_url):
    from amohook.store.migrations import LATEST

    build(db_url, versions=range(1, LATEST + 1), drop_columns=REFRESH_COLUMNS)
    before = holds(db_url)
    line = refused(
        run_cli(["status"], db_url),
        "account.refresh_sent_at",
        "account.clock_skew",
        f"schema version {LATEST}",
        "restore a backup",
        "amohook init-auth",
    )
    assert "s3cret" not in line
    assert holds(db_url) == before  # nothing added, nothing recorded, the account still there


def test_the_refusal_names_the_store_without_its_password(tmp_path):
    """PostgreSQL under the test server's trust authentication accepts (and ignores) a password."""
    from amohook.store.migrations import LATEST
    from tests.conftest import make_database

    url, drop = make_database("postgres", tmp_path)
    try:
        p = urlsplit(url)
        with_password = urlunsplit((p.scheme, f"{p.username}:pa55-Word@{p.netloc.rsplit('@', 1)[-1]}", p.path, "", ""))
        build(with_password, versions=range(1, LATEST + 1), drop_columns=REFRESH_COLUMNS)
        for traceback in ([], ["--traceback"]):
            result = run_cli([*traceback, "status"], with_password)
            assert result.returncode == ExitCode.USAGE
            assert f"{p.username}:***@" in result.stderr
            assert "pa55-Word" not in result.stdout + result.stderr
    finally:
        drop()


def test_a_store_from_the_commit_where_version_2_was_reconciliation_is_refused(db_url):
    """The issue's store: versions 1 and 2 recorded, reconciliation's tables and event.source
    present, the refresh marker's columns (today's version 2) missing."""
    build(db_url, versions=[1, 2], drop_columns=REFRESH_COLUMNS)
    refused(run_cli(["status"], db_url), "missing column account.refresh_sent_at")
    versions, tables, accounts = holds(db_url)
    assert accounts == ["example"]
    assert "refresh_sent_at" not in tables["account"]


def test_a_column_of_another_kind_of_type_is_refused(db_url):
    """Loosely typed: event.entity_id holds ids as text (amoCRM's can exceed 64 bits); an integer
    column there is a schema this amohook did not make."""
    from peewee import BigIntegerField

    from amohook.store.migrations import LATEST

    build(db_url, versions=range(1, LATEST + 1), retype=[("event", "entity_id", BigIntegerField(null=True))])
    refused(run_cli(["status"], db_url), "column event.entity_id is ", "not text")


def test_cron_refresh_token_is_refused_with_exit_2_not_retried(sqlite_url):
    from amohook.store.migrations import LATEST

    build(sqlite_url, versions=range(1, LATEST + 1), drop_columns=REFRESH_COLUMNS)
    refused(run_cli(["refresh-token", "--quiet"], sqlite_url), "account.refresh_sent_at")


def test_a_migration_that_finds_its_table_missing_says_so(db_url):
    """Version 3 adds event.source: without an event table it must not fail as "temporary"."""
    build(db_url, versions=[1, 2], drop_tables=["event"])
    refused(run_cli(["status"], db_url), "missing table event")
    versions, tables, accounts = holds(db_url)
    assert versions == [1, 2] and accounts == ["example"]


def test_an_older_version_with_later_columns_already_there_is_upgraded(db_url):
    """Version 1 recorded, but event.source and one refresh column already present (a store an
    interrupted or earlier upgrade left): each step adds only what is missing."""

    build(db_url, versions=[1], drop_columns=[("account", "clock_skew")], drop_tables=RECONCILIATION_TABLES)
    result = run_cli(["status", "--json"], db_url)
    assert result.returncode == 0, result.stderr
    versions, tables, accounts = holds(db_url)
    assert versions == recorded_versions() and accounts == ["example"]
    assert {"refresh_sent_at", "clock_skew"} <= tables["account"]
    assert set(RECONCILIATION_TABLES) <= set(tables)


def test_an_old_store_is_upgraded_and_a_fresh_store_works(db_url):

    build(
        db_url,
        versions=[1],
        drop_columns=[*REFRESH_COLUMNS, ("event", "source")],
        drop_tables=RECONCILIATION_TABLES,
    )
    assert run_cli(["status", "--json"], db_url).returncode == 0
    versions, tables, accounts = holds(db_url)
    assert versions == recorded_versions() and accounts == ["example"]
    assert "source" in tables["event"] and {"refresh_sent_at", "clock_skew"} <= tables["account"]
    assert "enums" in tables["custom_field"]
    assert run_cli(["status", "--json"], db_url).returncode == 0


def test_a_store_of_version_3_gets_the_options_of_select_fields(db_url):
    """Version 6 adds custom_field.enums to a store made before it; its rows keep None until the
    next sync-entities, and `rules check` leaves their values to amoCRM meanwhile."""
    build(db_url, versions=[1, 2, 3], drop_columns=[("custom_field", "enums")])
    assert "enums" not in tables_of(db_url)["custom_field"]
    assert run_cli(["status", "--json"], db_url).returncode == 0
    versions, tables, accounts = holds(db_url)
    assert versions == recorded_versions() and 6 in versions and accounts == ["example"]
    assert "enums" in tables["custom_field"]


def test_a_fresh_store_is_made_and_passes_its_own_check(db_url):
    from amohook.store import open_store

    refused(run_cli(["status", "--json"], db_url), "no amohook store at", "init-auth")  # only a start makes it
    if db_url.startswith("sqlite"):
        assert not os.path.exists(db_url[len("sqlite:///") :])
    else:
        assert tables_of(db_url) == {}
    open_store(db_url).close()
    result = run_cli(["status", "--json"], db_url)
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr
    assert run_cli(["status", "--json"], db_url).returncode == 0


def test_a_store_of_a_newer_amohook_is_refused(db_url):
    from amohook.store.migrations import LATEST

    build(db_url, versions=range(1, LATEST + 1), extra_versions=[LATEST + 1])
    refused(run_cli(["status"], db_url), f"schema version {LATEST + 1}", f"knows ({LATEST})", "upgrade")
    assert holds(db_url)[0] == [*recorded_versions(), LATEST + 1]


def test_a_database_holding_someone_elses_tables_is_not_touched(db_url):
    """No schema_version but a table named like one of ours: another application's database."""
    from amohook.store.db import connect_url

    if db_url.startswith("sqlite"):
        import sqlite3

        path = db_url[len("sqlite:///") :]
        conn = sqlite3.connect(path)
        conn.execute('CREATE TABLE "user" (login VARCHAR(40), pw VARCHAR(80))')
        conn.commit()
        conn.close()
        # Refused before peewee opens it: not even switched to WAL.
        refused(run_cli(["status"], db_url), "another program's SQLite database", "nothing was changed")
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("user",)]
        conn.close()
        return
    db = connect_url(db_url)
    quote = "`" if db_url.startswith("mysql") else '"'
    db.execute_sql(f"CREATE TABLE {quote}user{quote} (login VARCHAR(40), pw VARCHAR(80))")
    db.close()
    refused(run_cli(["status"], db_url), "(user)", "a database of its own")
    assert tables_of(db_url) == {"user": {"login", "pw"}}


def test_doctor_fails_the_database_check_of_a_store_without_its_columns(db_url):
    from amohook.store.migrations import LATEST

    build(db_url, versions=range(1, LATEST + 1), drop_columns=REFRESH_COLUMNS)
    result = run_cli(["doctor"], db_url)
    assert result.returncode == ExitCode.UNHEALTHY, result.stdout + result.stderr
    assert result.stdout.startswith("✗ database: "), result.stdout
    assert "account.refresh_sent_at" in result.stdout.splitlines()[0]
    assert "Traceback" not in result.stdout + result.stderr


# -- a database that does not exist --------------------------------------------------------------
def _missing(server_url: str | None, what: str) -> str:
    if not server_url:
        pytest.skip(f"{what} is not set")
    p = urlsplit(server_url)
    return urlunsplit((p.scheme, p.netloc, f"/amohook_absent_{uuid.uuid4().hex[:8]}", "", ""))


@pytest.mark.parametrize(
    "backend, statement",
    [
        ("mysql", "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"),
        ("postgres", 'CREATE DATABASE "{name}" OWNER "{user}"'),
    ],
)
def test_a_database_that_does_not_exist_is_exit_2_with_its_create_statement(backend, statement):
    url = _missing(MYSQL_URL if backend == "mysql" else POSTGRES_URL, f"AMOHOOK_TEST_{backend.upper()}_URL")
    name, user = urlsplit(url).path[1:], urlsplit(url).username
    for command in (["status"], ["refresh-token", "--quiet"]):
        refused(run_cli(command, url), f"'{name}' does not exist", statement.format(name=name, user=user))


def test_a_mysql_database_the_user_may_not_see_is_exit_2_with_create_and_grant():
    """MySQL answers a user without rights with 1044 (access denied), not 1049, for a missing database."""
    pymysql = pytest.importorskip("pymysql")
    url = _missing(MYSQL_URL, "AMOHOOK_TEST_MYSQL_URL")
    p = urlsplit(url)
    admin = pymysql.connect(host=p.hostname, port=p.port or 3306, user=p.username or "root", autocommit=True)
    user = f"amohook_np_{int(time.time() * 1000) % 10**8}"
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE USER '{user}'@'%%' IDENTIFIED BY %s", ("pa55-Word",))
        as_user = urlunsplit((p.scheme, f"{user}:pa55-Word@{p.hostname}:{p.port or 3306}", p.path, "", ""))
        line = refused(run_cli(["status"], as_user), "CREATE DATABASE", "GRANT ALL PRIVILEGES ON", user)
        assert "pa55-Word" not in line
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")
        admin.close()


@pytest.mark.parametrize("scheme", ["mysql", "postgresql"])
def test_a_refused_connection_stays_temporary(scheme):
    url = f"{scheme}://amohook@127.0.0.1:1/amohook"
    result = run_cli(["status"], url, env=cli_env(url, AMOHOOK_DB_TIMEOUT="3"))
    assert result.returncode == ExitCode.TEMPORARY, result.stderr


def test_a_version_3_store_gets_the_watchdogs_removal_mark(db_url):
    """Version 5 adds subscription.removed_at (what the watchdog removed itself, to add back)."""
    build(db_url, versions=[1, 2, 3], drop_columns=[("subscription", "removed_at")])
    assert "removed_at" not in tables_of(db_url)["subscription"]
    result = run_cli(["status", "--json"], db_url)
    assert result.returncode == 0, result.stderr
    versions, tables, _ = holds(db_url)
    assert 5 in versions and "removed_at" in tables["subscription"]


def test_an_upgrade_in_one_mysql_database_does_not_hold_up_a_store_in_another(tmp_path):
    """MySQL's GET_LOCK names are server-wide: the schema lock is named per database, so stores in
    other databases of the same server (another install, a test beside it) never wait for it."""
    if not MYSQL_URL:
        pytest.skip("AMOHOOK_TEST_MYSQL_URL is not set")
    from amohook.errors import StoreError
    from amohook.store import open_store
    from amohook.store.db import connect_url
    from amohook.store.migrations import schema_lock_name
    from tests.conftest import make_database

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    url_a, drop_a = make_database("mysql", tmp_path / "a")
    url_b, drop_b = make_database("mysql", tmp_path / "b")
    upgrading = connect_url(url_a)
    try:
        # Another process is upgrading store A and holds its schema lock.
        [(name,)] = upgrading.execute_sql(f"SELECT {schema_lock_name()}").fetchall()
        assert upgrading.execute_sql("SELECT GET_LOCK(%s, 0)", (name,)).fetchone()[0] == 1
        open_store(url_b, timeout=2).close()  # made and migrated, no wait
        # Store A itself waits for the upgrade under way, and says so.
        with pytest.raises(StoreError, match="upgrading the database schema"):
            open_store(url_a, timeout=2)
    finally:
        upgrading.close()
        drop_a()
        drop_b()
