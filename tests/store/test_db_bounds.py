"""Database URLs and database waits: bad URLs are refused in one line, a silent server ends in time.

No shared database server is stopped here: a loopback "black hole" (accepts, never answers), a
fake MySQL greeting followed by silence, and a TCP relay that can freeze in front of the real
MariaDB/PostgreSQL stand in for a hung server.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import pytest

from amohook.errors import ExitCode
from tests.conftest import cli_env, make_database, run_cli

PASSWORD_PARTS = ("s3crPART", "TAILpw9")


@pytest.mark.parametrize(
    "url, says",
    [
        ("mysql://", "names no database"),
        ("postgresql://", "names no database"),
        ("mysql://root@127.0.0.1:3306/", "names no database"),
        ("postgresql://app:s3crPART@127.0.0.1:5432/", "names no database"),
        ("mysql://root@127.0.0.1:99999/amohook", "port from 1 to 65535"),
        ("postgresql://app:s3crPARTTAILpw9@db:99999/amohook", "port from 1 to 65535"),
        ("mysql://root@127.0.0.1/amohook?charset=bogus", "unknown charset"),
        ("mysql://root@127.0.0.1/amohook?bogus=1", "unknown option"),
        ("postgresql://app@127.0.0.1/amohook?sslmode=maybe", "unknown sslmode"),
        ("mysql://app:s3crPART/TAILpw9@127.0.0.1/amohook", "percent-encode the password"),
        ("mysql://app:s3crPART#TAILpw9@127.0.0.1/amohook", "percent-encode the password"),
        ("postgresql://app:s3crPART?TAILpw9@127.0.0.1/amohook", "percent-encode the password"),
        ("postgresql://app:s3crPART/TAILpw9@127.0.0.1:5432/amohook", "percent-encode the password"),
    ],
)
@pytest.mark.parametrize("traceback", [False, True])
def test_a_bad_database_url_is_one_line_exit_2_and_never_shows_the_password(tmp_path, url, says, traceback):
    args = (["--traceback"] if traceback else []) + ["status"]
    result = run_cli(args, url, timeout=30)
    assert result.returncode == ExitCode.USAGE, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    if not traceback:
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert says in lines[-1]
    for part in PASSWORD_PARTS:
        assert part not in result.stdout + result.stderr


def test_a_percent_encoded_password_reaches_the_server_decoded(tmp_path):
    """The fix the errors name must work: %2F in the URL is '/' in the password."""
    pymysql = pytest.importorskip("pymysql")
    from tests.conftest import MYSQL_URL

    if not MYSQL_URL:
        pytest.skip("AMOHOOK_TEST_MYSQL_URL is not set")
    url, drop = make_database("mysql", tmp_path)
    p = urlsplit(url)
    admin = pymysql.connect(
        host=p.hostname, port=p.port or 3306, user=p.username or "root", password=p.password or "", autocommit=True
    )
    user = f"amohook_pw_{int(time.time() * 1000) % 10**8}"
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE USER '{user}'@'%%' IDENTIFIED BY %s", ("a/b?c#d@e%f",))
            cur.execute(f"GRANT ALL ON `{p.path[1:]}`.* TO '{user}'@'%'")
        encoded = urlunsplit((p.scheme, f"{user}:a%2Fb%3Fc%23d%40e%25f@{p.hostname}:{p.port or 3306}", p.path, "", ""))
        from amohook.store import open_store

        open_store(url).close()  # the store (`status` makes none)
        result = run_cli(["status", "--json"], encoded, timeout=60)
        assert result.returncode == 0, result.stderr
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")
        admin.close()
        drop()


def test_a_bad_db_timeout_is_refused(sqlite_url):
    result = run_cli(["status"], sqlite_url, env=cli_env(sqlite_url, AMOHOOK_DB_TIMEOUT="soon"))
    assert result.returncode == ExitCode.USAGE
    assert "AMOHOOK_DB_TIMEOUT" in result.stderr


class BlackHole:
    """A loopback TCP server that accepts connections and then says nothing (or only ``greeting``)."""

    def __init__(self, greeting: bytes = b""):
        self.greeting = greeting
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.greeting:
                conn.sendall(self.greeting)

    def close(self):
        self.sock.close()
        for conn in self.conns:
            conn.close()


def mysql_greeting() -> bytes:
    """A MySQL protocol-10 handshake, so the client sends its login and then waits for an answer."""
    salt = b"abcdefghijklmnopqrst"
    caps = 0xF7FF | (0x81BF << 16)  # includes PROTOCOL_41, SECURE_CONNECTION, PLUGIN_AUTH
    payload = (
        b"\x0a"
        + b"10.11.0-MariaDB\x00"
        + struct.pack("<I", 7)
        + salt[:8]
        + b"\x00"
        + struct.pack("<H", caps & 0xFFFF)
        + b"\x2d"
        + struct.pack("<H", 2)
        + struct.pack("<H", caps >> 16)
        + bytes([21])
        + b"\x00" * 10
        + salt[8:]
        + b"\x00"
        + b"mysql_native_password\x00"
    )
    return struct.pack("<I", len(payload))[:3] + b"\x00" + payload


@pytest.mark.parametrize(
    "scheme, greeting",
    [("mysql", b""), ("postgresql", b""), ("mysql", mysql_greeting())],
    ids=["mysql-silent", "postgres-silent", "mysql-greets-then-silent"],
)
@pytest.mark.parametrize("command", [["status"], ["refresh-token"]])
@pytest.mark.slow
def test_a_server_that_never_answers_ends_the_command_within_the_bound(scheme, greeting, command):
    hole = BlackHole(greeting)
    try:
        url = f"{scheme}://amohook:pw@127.0.0.1:{hole.port}/amohook"
        started = time.monotonic()
        result = run_cli(command, url, env=cli_env(url, AMOHOOK_DB_TIMEOUT="2"), timeout=40)
        elapsed = time.monotonic() - started
    finally:
        hole.close()
    assert result.returncode == ExitCode.TEMPORARY, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not answer within 2 s" in lines[0], result.stderr
    assert elapsed < 8, f"took {elapsed:.1f} s with a 2 s bound"


class Relay:
    """A TCP relay to a real database server that can be frozen: bytes stop flowing both ways."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.frozen = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            while self.frozen.is_set():
                time.sleep(0.05)
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self):
        self.frozen.clear()
        self.sock.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


@pytest.mark.parametrize("backend", ["mysql", "postgres"])
def test_a_server_that_stops_answering_mid_session_fails_the_query_within_the_bound(backend, tmp_path):
    import peewee

    from amohook.store import open_store
    from amohook.store.models import Account

    url, drop = make_database(backend, tmp_path)
    p = urlsplit(url)
    relay = Relay(p.hostname, p.port or (3306 if backend == "mysql" else 5432))
    netloc = (p.username or "") + (f":{p.password}" if p.password else "") + f"@127.0.0.1:{relay.port}"
    store = open_store(urlunsplit((p.scheme, netloc, p.path, "", "")), timeout=2)
    outcome: list = []
    try:
        assert Account.select().count() == 0
        relay.frozen.set()  # as if the server were stopped with SIGSTOP

        def query():
            started = time.monotonic()
            try:
                Account.select().count()
                outcome.append(("answered", time.monotonic() - started))
            except peewee.PeeweeException as exc:
                outcome.append((type(exc).__name__, time.monotonic() - started))

        worker = threading.Thread(target=query, daemon=True)
        worker.start()
        worker.join(15)
        assert outcome, "the query still waits on a frozen server after 15 s"
        kind, elapsed = outcome[0]
        assert kind == "OperationalError" and elapsed < 6, outcome
    finally:
        relay.close()
        store.close()
        drop()
