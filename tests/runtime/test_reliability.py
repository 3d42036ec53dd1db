"""Reliability of `amohook serve` and `amohook worker` as real processes on loopback.

Each test starts the real CLI in a subprocess, does to it what production will (bursts, kill -9,
a failing database, hostile requests, SIGTERM) and checks the store afterwards. Slow: about two
minutes for the whole file on a 2-core machine with all three backends.
"""

from __future__ import annotations

import http.client
import itertools
import json
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from amohook.webhooks.parse import parse_webhook
from tests.conftest import MYSQL_URL, POSTGRES_URL, ROOT, _mysql_admin, _pg_admin, cli_env
from tests.helpers.deliveries import FIXTURES, FORM, fixture_body

pytestmark = pytest.mark.slow

SECRET = "reliability-secret-0123456789"
HOOK = f"/webhook/{SECRET}"
HANDLERS = textwrap.dedent(
    """
    import json, os, random, time

    def _log(*fields):
        # One short write with O_APPEND: lines from several processes never interleave.
        line = (json.dumps(fields) + "\\n").encode()
        fd = os.open(os.environ["RECORD_TO"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def record(event, ctx):
        start = time.time()
        time.sleep(random.uniform(0, 0.01))
        _log(event.id, os.getpid(), start, time.time())

    def hang_first(event, ctx):
        _log("start", event.id, os.getpid())
        if os.environ.get("HANG"):
            time.sleep(600)

    def slow(event, ctx):
        _log("start", event.id)
        time.sleep(1.0)
        _log("end", event.id)
    """
)


# -- helpers -----------------------------------------------------------------------------------
class Proc:
    """A real `amohook` subprocess whose output is read in the background."""

    def __init__(self, args: list[str], db_url: str, *, env: dict | None = None, ready: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "amohook", *args],
            env=env or cli_env(db_url),
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, False), daemon=True).start()
        self.first = self.wait_for(ready)

    def _pump(self, stream, sink: list, signal_lines: bool) -> None:
        for line in stream:
            sink.append(line)
            if signal_lines:
                self.lines.put(line)
        if signal_lines:
            self.lines.put(None)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"no {text!r} from amohook; stderr: {''.join(self.stderr)[-2000:]}")
            if text in line:
                return line

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Serve(Proc):
    def __init__(self, db_url: str, *args: str, env: dict | None = None):
        env = env or cli_env(db_url)
        env.setdefault("AMOHOOK_WEBHOOK_SECRET", SECRET)
        super().__init__(["serve", "--port", "0", "--workers", "0", *args], db_url, env=env, ready="listening on")
        match = re.search(r"http://127\.0\.0\.1:(\d+)", self.first)
        assert match, self.first
        self.address = ("127.0.0.1", int(match.group(1)))


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.close()


def post(address, body: bytes, path: str = HOOK, timeout: float = 10) -> int:
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": FORM, "Connection": "close"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def get(address, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def unique_body(n: int) -> bytes:
    """A real body (fixture 01) about lead n."""
    return re.sub(
        rb"(%5Bid%5D=)\d+", lambda m: m.group(1) + str(n).encode(), fixture_body("01_lead_status_2016.txt"), count=1
    )


def open_db(db_url: str):
    from amohook.store import open_store

    return open_store(db_url)


def count(model) -> int:
    return model.select().count()


def handler_env(db_url: str, tmp_path: Path, **extra: str) -> dict:
    (tmp_path / "rel_hooks.py").write_text(HANDLERS)
    env = cli_env(db_url, PYTHONPATH=f"{ROOT}:{tmp_path}", RECORD_TO=str(tmp_path / "record.jsonl"), **extra)
    return env


def records(tmp_path: Path) -> list:
    path = tmp_path / "record.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def all_done(db_url: str) -> bool:
    """Every queued event is done (read on a fresh connection, closed after)."""
    from amohook.store.models import Event

    open_db(db_url)
    try:
        return Event.select().where(Event.status != "done").count() == 0
    finally:
        Event._meta.database.close()


def queue_events(db_url: str, count_: int, items: int = 1) -> None:
    from amohook import inbox
    from tests.helpers.deliveries import incoming, lead_body

    store = open_db(db_url)
    inbox.store_deliveries(
        store, [incoming(lead_body(10_000 + i * items, items=items), received_at=time.time()) for i in range(count_)]
    )


# -- kill -9 in the middle of a burst ----------------------------------------------------------
def test_every_acknowledged_request_survives_kill_9_mid_burst_and_resends_end_with_exactly_1000(db_url, procs):
    from amohook.store.models import Delivery, Event

    total, senders = 1000, 16
    bodies = [unique_body(5_000_000 + i) for i in range(total)]
    ledger: dict[int, int] = {}
    lock = threading.Lock()
    serve = Serve(db_url)
    procs.append(serve)
    todo: queue.Queue = queue.Queue()
    for i in range(total):
        todo.put(i)
    killed = threading.Event()

    def sender():
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                status = post(serve.address, bodies[i], timeout=5)
            except (OSError, http.client.HTTPException):  # the server died under us
                status = -1
            with lock:
                ledger[i] = status
                acked = sum(1 for s in ledger.values() if s == 200)
            if acked >= 300 and not killed.is_set():
                killed.set()
                serve.proc.kill()  # SIGKILL: no clean-up of any kind

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    serve.proc.wait(10)
    acked = {i for i, s in ledger.items() if s == 200}
    assert killed.is_set() and 300 <= len(acked) < total, len(acked)
    print(
        f"acknowledged before kill -9: {len(acked)}; failed: {sum(1 for s in ledger.values() if s != 200)}; "
        f"never sent: {total - len(ledger)}"
    )

    # Every 200 is in the store, right after the crash.
    from amohook.inbox import Incoming

    open_db(db_url)
    stored = {d.body_sha256 for d in Delivery.select(Delivery.body_sha256)}
    missing = [i for i in acked if Incoming(bodies[i], None).sha256 not in stored]
    assert missing == []
    Delivery._meta.database.close()

    # amoCRM resends what was not acknowledged; the listener comes back on the same store.
    again = Serve(db_url)
    procs.append(again)
    resend: queue.Queue = queue.Queue()
    for i in range(total):
        if i not in acked:
            resend.put(i)
    answers: list[int] = []

    def resender():
        while True:
            try:
                i = resend.get_nowait()
            except queue.Empty:
                return
            answers.append(post(again.address, bodies[i]))

    threads = [threading.Thread(target=resender) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers and set(answers) == {200}
    open_db(db_url)
    assert count(Delivery) == total and count(Event) == total
    ids = [e.entity_id for e in Event.select(Event.entity_id)]
    assert len(set(ids)) == total


# -- a failing store ---------------------------------------------------------------------------
def _drop(db_url: str) -> None:
    parts = urlsplit(db_url)
    name = parts.path.lstrip("/")
    if db_url.startswith("mysql"):
        conn = _mysql_admin(MYSQL_URL)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
    else:
        conn = _pg_admin(POSTGRES_URL)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


def test_a_failing_store_answers_503_never_200_and_a_wrong_secret_stores_nothing(db_url, procs):
    from amohook.store.models import Delivery

    serve = Serve(db_url, "--log-level", "error")
    procs.append(serve)
    assert post(serve.address, unique_body(1), path="/webhook/not-the-secret-0123456789") == 404
    assert post(serve.address, unique_body(2)) == 200
    open_db(db_url)
    assert count(Delivery) == 1
    Delivery._meta.database.close()

    if db_url.startswith("sqlite"):
        # Another process holds SQLite's write lock for longer than amoCRM's 2 s budget.
        locker = sqlite3.connect(urlsplit(db_url).path, timeout=0, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            started = time.monotonic()
            statuses = [post(serve.address, unique_body(3 + i)) for i in range(3)]
            assert statuses == [503, 503, 503]
            assert time.monotonic() - started < 3 * 1.9  # each answered within amoCRM's 2 s
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert post(serve.address, unique_body(3)) == 200  # the store is back: so is 200
    else:
        _drop(db_url)  # the database disappears under the running listener
        statuses = [post(serve.address, unique_body(10 + i)) for i in range(5)]
        assert set(statuses) == {503}
        status, text = get(serve.address, "/healthz")
        health = json.loads(text)
        assert status == 503 and health["status"] == "degraded" and health["commits"].startswith("failing: ")
    assert "Traceback" not in "".join(serve.stderr)


# -- hostile requests --------------------------------------------------------------------------
def _req(head: str, body: bytes = b"", content_type: str | None = FORM, length: int | None = None) -> bytes:
    lines = [head, "Host: 127.0.0.1"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _post(body: bytes, content_type: str | None = FORM) -> bytes:
    return _req(f"POST {HOOK} HTTP/1.1", body, content_type)


DEEP = "leads" + "[a]" * 1000 + "=1"
CORPUS = [
    ("oversized Content-Length", _req(f"POST {HOOK} HTTP/1.1", length=2 * 2**20), 413),
    ("one byte over 1 MiB", _req(f"POST {HOOK} HTTP/1.1", length=2**20 + 1), 413),
    ("oversized with a body on the way", _req(f"POST {HOOK} HTTP/1.1", b"x" * 100_000, length=5 * 2**20), 413),
    ("invalid UTF-8 byte", _post(b"leads%5Badd%5D%5B0%5D%5Bname%5D=\xff\xfe"), 200),  # PHP reads it (U+FFFD)
    ("invalid UTF-8 percent-encoded", _post(b"leads%5Badd%5D%5B0%5D%5Bname%5D=%FF"), 200),  # PHP reads it (U+FFFD)
    ("invalid UTF-8 in a key", _post(b"leads%5B%C3%5D=1"), 200),  # PHP reads it (U+FFFD)
    ("overlong UTF-8", _post(b"a=%C0%AF"), 200),  # PHP reads it (U+FFFD)
    ("unclosed inner bracket", _post(b"leads[status[0]=1"), 200),  # PHP reads it (hardening #17)
    ("unbalanced bracket", _post(b"leads[status][0=1"), 200),  # PHP reads it (hardening #17)
    ("text after a bracket", _post(b"leads[a]b=1"), 200),  # PHP reads it (hardening #17)
    ("key without a name", _post(b"[a]=1"), 200),  # PHP reads it (hardening #17)
    ("1,000-deep brackets", _post(DEEP.encode()), 200),  # PHP reads it (hardening #17)
    ("33-deep brackets", _post(("a" + "[b]" * 33 + "=1").encode()), 200),  # PHP reads it (hardening #17)
    ("20,000 fields", _post("&".join(f"f{i}=1" for i in range(20_000)).encode()), 400),
    ("value and container at once", _post(b"a[b]=1&a[b][c]=2"), 200),  # PHP reads it (hardening #17)
    ("invalid JSON", _post(b'{"leads":', "application/json"), 400),
    ("JSON array at the top", _post(b"[1,2]", "application/json"), 400),
    ("1,000-deep JSON", _post(b'{"a":' * 1000 + b"1" + b"}" * 1000, "application/json"), 400),
    ("JSON NaN", _post(b'{"a": NaN}', "application/json"), 400),
    ("JSON lone surrogate", _post(b'{"leads": {"add": [{"id": "\\ud800"}]}}', "application/json"), 400),
    ("NUL byte in the body", _post(b"leads%5Badd%5D%5B0%5D%5Bid%5D=1&x=\x00"), 200),  # PHP reads it (U+FFFD)
    ("entity name of 100 characters", _post(("e" * 100 + "%5Badd%5D%5B0%5D%5Bid%5D=1").encode()), 400),
    ("GET on the webhook", f"GET {HOOK} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 405),
    ("PUT on the webhook", _req(f"PUT {HOOK} HTTP/1.1", b"a=1"), 405),
    ("DELETE on healthz", b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    ("an invented method", b"BREW /webhook HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    ("text/plain", _post(b"a=1", "text/plain"), 415),
    ("multipart", _post(b"--x--", "multipart/form-data; boundary=x"), 415),
    ("XML", _post(b"<a/>", "application/xml"), 415),
    ("no Content-Length", f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\n\r\na=1".encode(), 411),
    (
        "chunked",
        f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\na=1\r\n0\r\n\r\n".encode(),
        411,
    ),
    (
        "Content-Length not a number",
        _req(f"POST {HOOK} HTTP/1.1", length=None).replace(b"Content-Length: 0", b"Content-Length: ten"),
        400,
    ),
    (
        "two different Content-Lengths",
        f"POST {HOOK} HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\na=1".encode(),
        400,
    ),
    ("body shorter than Content-Length", _req(f"POST {HOOK} HTTP/1.1", b"a=1", length=50), 400),
    ("garbage request line", b"HELLO\r\n\r\n", 400),
    ("request line too long", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    ("header line too long", b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ("wrong secret", _req("POST /webhook/guess-guess-guess-guess HTTP/1.1", b"a=1"), 404),
    ("no secret", _req("POST /webhook/ HTTP/1.1", b"a=1"), 404),
    ("unknown path", b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    ("slow sender: headers then silence", _req(f"POST {HOOK} HTTP/1.1", b"leads", length=100), 408),
]
TRICKLE = "slow sender: one byte at a time, never quite silent"


def _send(address, data: bytes, *, trickle: bool = False) -> bytes:
    with socket.create_connection(address, timeout=15) as sock:
        try:
            if trickle:
                sock.sendall(f"POST {HOOK} HTTP/1.1\r\n".encode())
                for _ in range(30):
                    sock.sendall(b"X")
                    time.sleep(0.25)
            else:
                sock.sendall(data)
                if b"a=1" in data[-3:] and b"Content-Length: 50" in data:
                    sock.shutdown(socket.SHUT_WR)  # the client gives up sending: EOF mid-body
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_corpus_of_bad_requests_each_gets_its_4xx_and_the_server_keeps_serving(sqlite_url, procs):
    from amohook.store.models import Delivery

    assert len(CORPUS) + 1 >= 30
    serve = Serve(sqlite_url, "--request-timeout", "1", "--read-deadline", "2")
    procs.append(serve)
    failures = []

    def check(name: str, answer: bytes, expected: int) -> None:
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
        if status != expected or b"Traceback" in answer or b'File "' in answer:
            failures.append((name, expected, answer[:200]))

    # Several at once, as a real burst of junk would arrive; the slow ones overlap the others.
    threads = []
    results: dict[str, bytes] = {}
    for name, data, _ in CORPUS:
        threads.append(threading.Thread(target=lambda n=name, d=data: results.__setitem__(n, _send(serve.address, d))))
    threads.append(
        threading.Thread(target=lambda: results.__setitem__(TRICKLE, _send(serve.address, b"", trickle=True)))
    )
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for name, _, expected in CORPUS:
        check(name, results.get(name, b""), expected)
    check(TRICKLE, results.get(TRICKLE, b""), 408)
    assert failures == []

    assert post(serve.address, unique_body(1)) == 200
    assert get(serve.address, "/healthz")[0] == 200
    open_db(sqlite_url)
    accepted = sum(1 for _, _, expected in CORPUS if expected == 200)
    assert count(Delivery) == 1 + accepted  # the bodies PHP reads are stored; no refused one is
    assert "Traceback" not in "".join(serve.stderr)


# -- workers -----------------------------------------------------------------------------------
def test_a_worker_killed_while_holding_events_leaves_them_to_be_claimed_after_the_lease(db_url, tmp_path, procs):
    from amohook.store.models import Attempt, Event

    queue_events(db_url, 20)
    env = handler_env(db_url, tmp_path, HANG="1")
    doomed = Proc(
        ["worker", "--handler", "rel_hooks:hang_first", "--lease", "2", "--batch", "5", "--poll", "0.1"],
        db_url,
        env=env,
        ready="worker started",
    )
    procs.append(doomed)
    wait_until(lambda: any(r[0] == "start" for r in records(tmp_path)), 20, "the first handler to start")
    doomed.proc.kill()
    doomed.proc.wait(10)
    open_db(db_url)
    held = [e.id for e in Event.select().where(Event.status == "running")]
    assert len(held) == 5
    Event._meta.database.close()

    env = handler_env(db_url, tmp_path)
    survivor = Proc(
        ["worker", "--handler", "rel_hooks:hang_first", "--lease", "2", "--poll", "0.2"],
        db_url,
        env=env,
        ready="worker started",
    )
    procs.append(survivor)

    wait_until(lambda: all_done(db_url), 40, "every event to be done")
    survivor.signal(signal.SIGTERM)
    assert survivor.wait(10) == 0
    open_db(db_url)
    for event_id in held:
        outcomes = [a.outcome for a in Attempt.select().where(Attempt.event_id == event_id).order_by(Attempt.id)]
        assert outcomes == ["expired", "ok"], (event_id, outcomes)
    for event in Event.select():
        oks = Attempt.select().where((Attempt.event_id == event.id) & (Attempt.outcome == "ok")).count()
        assert oks == 1


def test_two_worker_processes_never_run_the_same_event_at_once(db_url, tmp_path, procs):

    env = handler_env(db_url, tmp_path)
    args = [
        "worker",
        "--handler",
        "rel_hooks:record",
        "--lease",
        "30",
        "--batch",
        "3",
        "--workers",
        "2",
        "--poll",
        "0.05",
    ]
    workers = [Proc(args, db_url, env=env, ready="worker started") for _ in range(2)]
    procs.extend(workers)
    queue_events(db_url, 40, items=5)  # 200 events, queued while both workers are looking

    wait_until(lambda: all_done(db_url), 60, "every event to be done")
    for w in workers:
        w.signal(signal.SIGTERM)
    for w in workers:
        assert w.wait(10) == 0
    runs = records(tmp_path)
    by_event: dict[int, list] = {}
    for event_id, pid, start, end in runs:
        by_event.setdefault(event_id, []).append((start, end, pid))
    assert len(by_event) == 200
    overlapping = []
    for event_id, spans in by_event.items():
        spans.sort()
        for (_s1, e1, p1), (s2, _e2, p2) in itertools.pairwise(spans):
            if s2 < e1:
                overlapping.append((event_id, p1, p2))
    assert overlapping == []
    assert all(len(spans) == 1 for spans in by_event.values())  # nothing failed, so nothing ran twice
    assert len({pid for _, pid, _, _ in runs}) == 2  # both processes took part


def test_sigterm_finishes_the_running_event_releases_the_rest_and_exits_within_10_s(sqlite_url, tmp_path, procs):
    from amohook.store.models import Event

    env = handler_env(sqlite_url, tmp_path)
    env["AMOHOOK_WEBHOOK_SECRET"] = SECRET
    serve = Serve(sqlite_url, "--workers", "1", "--handler", "rel_hooks:slow", "--lease", "60", env=env)
    procs.append(serve)
    assert (
        post(
            serve.address,
            b"leads%5Badd%5D%5B0%5D%5Bid%5D=1&leads%5Badd%5D%5B1%5D%5Bid%5D=2"
            b"&leads%5Badd%5D%5B2%5D%5Bid%5D=3&account%5Bsubdomain%5D=example",
        )
        == 200
    )
    wait_until(lambda: any(r[0] == "start" for r in records(tmp_path)), 10, "the handler to start")
    started = time.monotonic()
    serve.signal(signal.SIGTERM)
    assert serve.wait(12) == 0
    assert time.monotonic() - started < 10
    with pytest.raises(OSError):
        socket.create_connection(serve.address, timeout=1).close()
    assert records(tmp_path) == [["start", 1], ["end", 1]]
    open_db(sqlite_url)
    rows = list(Event.select().order_by(Event.id))
    assert [r.status for r in rows] == ["done", "pending", "pending"]
    assert all(r.lease_owner is None and r.attempts == 0 for r in rows[1:])


# -- real bodies -------------------------------------------------------------------------------
def test_every_real_body_becomes_the_events_it_contains(db_url, procs):
    from amohook.store.models import Delivery, Event

    names = sorted(p.name for p in FIXTURES.glob("*.txt"))
    assert len(names) >= 10
    serve = Serve(db_url)
    procs.append(serve)
    for name in names:
        assert post(serve.address, fixture_body(name)) == 200, name
    for name in names:
        assert post(serve.address, fixture_body(name)) == 200, name  # amoCRM's retries: no new events
    open_db(db_url)
    from amohook.inbox import Incoming

    for name in names:
        body = fixture_body(name)
        expected = parse_webhook(body, FORM)
        delivery = Delivery.get(Delivery.body_sha256 == Incoming(body, None).sha256)
        assert delivery.times_received == 2 and delivery.body.encode() == body
        events = list(Event.select().where(Event.delivery_id == delivery.id).order_by(Event.idx))
        assert [(e.entity, e.action, e.entity_id, e.account, e.account_id, json.loads(e.data)) for e in events] == [
            (ev.entity, ev.action, ev.entity_id, expected.account_subdomain, expected.account_id, ev.data)
            for ev in expected.events
        ], name
        assert len(events) >= 1, name
    assert count(Event) == sum(len(parse_webhook(fixture_body(n), FORM).events) for n in names)
