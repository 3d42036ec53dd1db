"""Shared fixtures: a store on every backend, the fake amoCRM server, and running the real CLI.

Backends: SQLite always; MariaDB/MySQL when AMOHOOK_TEST_MYSQL_URL is set and PostgreSQL when
AMOHOOK_TEST_POSTGRES_URL is set (server URLs such as mysql://root@127.0.0.1:3306/ — each test
gets a database of its own, created here and dropped after). CI sets both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

# Compiled modules are cached (__pycache__/, ignored by git) even where PYTHONDONTWRITEBYTECODE is
# set, as on the test machine: the suite imports amohook and its test modules in every pytest-xdist
# worker and every amohook process it starts, and compiling them afresh each time (the test
# modules through pytest's assertion rewriting) was a quarter of the inner loop's CPU.
sys.dont_write_bytecode = False

ROOT = Path(__file__).resolve().parent.parent
MYSQL_URL = os.environ.get("AMOHOOK_TEST_MYSQL_URL")
POSTGRES_URL = os.environ.get("AMOHOOK_TEST_POSTGRES_URL")
BACKENDS = ["sqlite", "mysql", "postgres"]
# CI sets this so a missing database URL fails loudly instead of silently skipping.
REQUIRE_DB = bool(os.environ.get("AMOHOOK_REQUIRE_DB_TESTS"))


def _skip(reason: str):
    if REQUIRE_DB:
        pytest.fail(f"{reason}, but AMOHOOK_REQUIRE_DB_TESTS is set")
    pytest.skip(reason)


def _with_db(server_url: str, name: str) -> str:
    parts = urlsplit(server_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def _mysql_admin(server_url: str):
    import pymysql

    p = urlsplit(server_url)
    return pymysql.connect(
        host=p.hostname or "127.0.0.1",
        port=p.port or 3306,
        user=p.username or "root",
        password=p.password or "",
        autocommit=True,
    )


def _pg_admin(server_url: str):
    import psycopg2

    p = urlsplit(server_url)
    conn = psycopg2.connect(
        host=p.hostname or "127.0.0.1",
        port=p.port or 5432,
        user=p.username or "postgres",
        password=p.password or None,
        dbname="postgres",
    )
    conn.autocommit = True
    return conn


def make_database(backend: str, tmp_path: Path):
    """Create a fresh database; returns (url, drop)."""
    name = f"amohook_test_{uuid.uuid4().hex[:10]}"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'amohook.db'}", lambda: None
    if backend == "mysql":
        if not MYSQL_URL:
            _skip("AMOHOOK_TEST_MYSQL_URL is not set (e.g. mysql://root@127.0.0.1:3306/)")
        conn = _mysql_admin(MYSQL_URL)
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
        conn.close()

        def drop():
            c = _mysql_admin(MYSQL_URL)
            with c.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS {name}")
            c.close()

        return _with_db(MYSQL_URL, name), drop
    if backend == "postgres":
        if not POSTGRES_URL:
            _skip("AMOHOOK_TEST_POSTGRES_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/)")
        conn = _pg_admin(POSTGRES_URL)
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        conn.close()

        def drop():
            c = _pg_admin(POSTGRES_URL)
            with c.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            c.close()

        return _with_db(POSTGRES_URL, name), drop
    raise ValueError(backend)


@pytest.fixture(autouse=True)
def held_secrets_forgotten():
    """What one test's process held as secrets (``amohook.redact.HELD``) does not cut another's output."""
    yield
    from amohook.redact import HELD

    HELD.forget_all()


@pytest.fixture(autouse=True)
def alone_under_xdist(request, tmp_path_factory):
    """Tests marked ``alone`` (rates, latencies and CPU measured against wall-clock bounds) run
    while no other test does, when pytest-xdist runs tests in parallel (``-n``, pyproject's
    addopts); every other test runs alongside the rest. Two file locks shared by the workers: the
    gate, taken briefly by every test and held by an ``alone`` test so no new test starts, and the
    room, shared by ordinary tests and taken whole by an ``alone`` test once they have left."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    import fcntl

    base = tmp_path_factory.getbasetemp().parent  # the one directory all workers of this run share
    alone = request.node.get_closest_marker("alone") is not None
    with open(base / "alone.gate", "a") as gate, open(base / "alone.room", "a") as room:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(room, fcntl.LOCK_UN)
            if alone:
                fcntl.flock(gate, fcntl.LOCK_UN)


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    """A fresh, empty database URL on each backend (the test is skipped where none is configured)."""
    url, drop = make_database(request.param, tmp_path)
    yield url
    drop()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'amohook.db'}"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """A store migrated once per test process, for ``store`` to copy: creating the schema costs
    20-50 ms, copying the file about 1 ms (the migrations have tests of their own: test_schema_check)."""
    from amohook.store import open_store

    path = tmp_path_factory.mktemp("template") / "amohook.db"
    open_store(f"sqlite:///{path}").close()
    return path


def copy_template(template: Path, url: str) -> None:
    """Put a copy of the migrated template where ``url`` points, as `open_store` leaves a new store:
    mode 0600, each schema version applied now."""
    import shutil
    import sqlite3
    import time

    from amohook.store.db import sqlite_file

    path = sqlite_file(url)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with open(fd, "wb") as out, open(template, "rb") as src:
        shutil.copyfileobj(src, out)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET applied_at = ?", (time.time(),))
    conn.close()


@pytest.fixture
def store(db_url, request):
    from amohook.store import open_store

    if db_url.startswith("sqlite:"):
        copy_template(request.getfixturevalue("sqlite_template"), db_url)
    s = open_store(db_url)
    yield s
    s.close()


# amoCRM allows an integration 7 requests a second (docs/amocrm.md §3), and the fake refuses more
# with 429 as amoCRM does. A sync alone makes 8, so at that rate most tests would spend their time
# in the limiter's waits. Unless a test is marked ``amocrm_rate`` (the limiter's own tests, and
# those that count what crosses a second), the fake and this process's shared limiter both allow
# TEST_RATE: the same limiter and the same 429s, ten times faster. amohook processes that tests
# start keep the real 7, under the fake's higher ceiling.
TEST_RATE = 70


@pytest.fixture(autouse=True)
def amocrm_rate(request, monkeypatch) -> int:
    """The requests per second that the fake and this process's limiter allow (see TEST_RATE)."""
    from amohook.amocrm import ratelimit

    if request.node.get_closest_marker("amocrm_rate") is not None:
        return ratelimit.RATE
    monkeypatch.setattr(ratelimit, "RATE", TEST_RATE)
    return TEST_RATE


@pytest.fixture
def fake(amocrm_rate):
    """The fake amoCRM (tests/fakes/amocrm.py), started on an ephemeral port; the test fails if the
    fake itself hit an internal error (a bug in the fake must not pass as amohook's behaviour)."""
    from tests.fakes.amocrm import FakeAmo

    with FakeAmo(rate_limit=amocrm_rate) as server:
        yield server
        assert not server.errors, "FakeAmo hit an internal error:\n" + "\n".join(server.errors)


@pytest.fixture
def account(store, fake):
    """An account authorized against the fake server, as `init-auth` leaves it."""
    import time

    from amohook.amocrm.oauth import Client, TokenPair
    from amohook.tokens import save_authorization

    access, refresh = fake.issue_tokens()
    pair = TokenPair(access_token=access, refresh_token=refresh, expires_in=86400, issued_at=time.time())
    return save_authorization(
        store,
        subdomain="example",
        base_url=fake.base_url,
        client=Client(fake.client_id, fake.client_secret, fake.redirect_uri),
        pair=pair,
    )


def cli_env(db_url: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMOHOOK_") and k != "PYTHONDONTWRITEBYTECODE"}
    env["AMOHOOK_DB_URL"] = db_url
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


# Every command that ``run_cli`` waits for runs in the test's own process (about 0.4 s of CPU less
# than a process of its own; ~200 such starts were most of the inner loop's cost). The command gets
# a store of its own, opened afresh (a read-only or missing store fails as it would under cron), and
# the test's store is bound again afterwards. What needs a process of its own gets one: long-running
# `serve` and `worker` (tests start them with ``subprocess.Popen``), signals, kill -9, a prompt
# answered on stdin (``input``), a handler module on an import path of the test's own.
def in_process(args: list[str], env: dict | None) -> bool:
    """Whether ``args`` can run in this process: a command ``run_cli`` waits for ends by itself
    (`serve` and `worker` too: a refusal, or `--once`), unless its environment adds to the import
    path (a handler module of the test's own would stay in ``sys.modules``)."""
    if os.environ.get("AMOHOOK_TEST_SUBPROCESS"):
        return False
    if env is not None and env.get("PYTHONPATH", str(ROOT)) != str(ROOT):
        return False
    return bool(args)


def _as_a_new_process() -> None:
    """Forget what a command keeps for the rest of its process: the consoles (rich reads the
    terminal's settings when one is made) and the warnings said once per process."""
    common = sys.modules.get("amohook.cli.common")
    if common is not None:
        common._console = common._err_console = None
    watchdog = sys.modules.get("amohook.recovery.watchdog")
    if watchdog is not None:
        watchdog._said_no_admin.clear()


def run_cli_here(args: list[str], db_url: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI's entry point in this process, with captured output and ``env`` (default
    ``cli_env(db_url)``) as the whole environment for the call, restored after: safe while each
    test (and each pytest-xdist worker, a process of its own) runs one command at a time."""
    import contextlib
    import io
    import logging
    import signal

    from amohook.cli.app import run
    from amohook.cli.logs import LIBRARIES
    from amohook.store import models
    from amohook.store import open as store_open

    class Captured(io.StringIO):
        encoding = "utf-8"  # as a pipe from a UTF-8 locale: the output may hold ✓ and Cyrillic

    out, err = Captured(), Captured()
    saved = dict(os.environ)
    # What a command sets up for its process: the handlers and levels of logging, and signals.
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in ("amohook", *LIBRARIES))]
    levels = [(logger, logger.level) for logger in loggers]
    handlers = logging.getLogger().handlers[:]
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    # The models are bound process-wide to one store (``open_store``): the command opens its own,
    # as its process would, and the test's store is bound again after it (peewee reconnects it).
    # Its connection is closed first: the command's open reads the SQLite file's header with a
    # plain open()/close(), and a close() drops every POSIX lock this process holds on the file,
    # so another process could checkpoint the WAL under the test's live connection.
    tests_store = store_open._current
    if tests_store is not None:
        tests_store.close()
    store_open._current = None
    _as_a_new_process()
    try:
        os.environ.clear()
        os.environ.update(env if env is not None else cli_env(db_url))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
        logging.getLogger().handlers[:] = handlers
        for logger, level in levels:
            logger.setLevel(level)
        for sig, handler in signals.items():
            signal.signal(sig, handler)
        commands_store = store_open._current
        if commands_store is not None and commands_store is not tests_store:
            commands_store.close()
        store_open._current = tests_store
        _as_a_new_process()
        if tests_store is not None:
            models.database.initialize(tests_store.db)
    return subprocess.CompletedProcess(["amohook", *args], code, out.getvalue(), err.getvalue())


def run_cli(args: list[str], db_url: str, *, env: dict | None = None, input: str | None = None, timeout: float = 60):
    """Run the real `amohook` as cron or an admin would, through its entry point: in this process
    where ``in_process`` allows (same exit codes and output), else in a process of its own."""
    if input is None and in_process(args, env):
        return run_cli_here(args, db_url, env)
    return subprocess.run(
        [sys.executable, "-m", "amohook", *args],
        env=env or cli_env(db_url),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
    )


@pytest.fixture
def filled(sqlite_url):
    """A SQLite store holding a dead and a pending event (the `events` commands' tests)."""
    import time

    from amohook import inbox
    from amohook.store import open_store
    from tests.helpers.deliveries import claim, fixture_body, incoming

    store = open_store(sqlite_url)
    inbox.store_deliveries(
        store,
        [
            incoming(fixture_body("01_lead_status_2016.txt"), headers={"user-agent": "amoCRM-WebHook-client/1.0"}),
            incoming(fixture_body("13_contact_add_2016.txt")),
        ],
    )
    events = claim(store, "w1", now=time.time(), limit=1)
    inbox.fail(store, events[0].id, "w1", error="handler: boom", retry_at=None, started_at=time.time(), now=time.time())
    store.close()
    return sqlite_url


@pytest.fixture
def crm(store, fake, account, tmp_path):
    """The fake account with a Sales pipeline, a Call task type and Anna, synced into the store."""
    from amohook.amocrm.client import client_for
    from amohook.sync import sync_entities
    from tests.helpers.e2e import RULES

    pipeline = fake.add_pipeline("Sales", ["New", "Qualified"])
    stages = {s["name"]: s["id"] for s in pipeline["_embedded"]["statuses"]}
    call = fake.add_task_type("Call")
    anna = fake.add_user("Anna", "anna@example.com")
    sync_entities(store, client_for(store, "example"))
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    fake.clear_requests()
    return dict(
        pipeline=pipeline["id"],
        new=stages["New"],
        qualified=stages["Qualified"],
        call=call["id"],
        anna=anna["id"],
        rules=str(rules),
    )
