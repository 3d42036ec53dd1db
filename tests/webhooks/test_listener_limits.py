"""The listener under a connection flood, over real sockets: idle and trickling connections take no
thread, heads are bounded, the open-file limit is never a busy loop, and a real webhook still
gets its 200 in time."""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from amohook.store import open_store
from amohook.store.models import Event
from tests.conftest import ROOT, cli_env
from tests.helpers.deliveries import lead_body
from tests.helpers.listener import HOOK, SECRET, post, raw, start, status_of, timed_post


def open_idle(address, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(address)
        except BlockingIOError:
            pass
        socks.append(s)
    return socks


def close_all(socks) -> None:
    for s in socks:
        s.close()


@pytest.fixture
def service(sqlite_url):
    svc = start(open_store(sqlite_url))
    yield svc
    svc.stop(5)


def test_idle_connections_take_no_thread_and_do_not_keep_a_webhook_out(service):
    threads_before = threading.active_count()
    idle = open_idle(service.address, 300)
    try:
        time.sleep(0.5)
        assert service.httpd.open_connections() >= 250  # held, and answered nothing
        assert threading.active_count() - threads_before < 10  # not a thread each
        status, took = timed_post(service.address, 1)
        assert status == 200 and took < 1.0
    finally:
        close_all(idle)


def test_beyond_the_connection_cap_the_oldest_headless_connections_make_room(sqlite_url):
    svc = start(open_store(sqlite_url), max_connections=40)
    try:
        first = open_idle(svc.address, 40)
        time.sleep(0.3)
        later = open_idle(svc.address, 80)
        time.sleep(0.3)
        status, took = timed_post(svc.address, 1)
        assert status == 200 and took < 1.0
        assert svc.httpd.open_connections() <= 40
        first[0].setblocking(True)
        first[0].settimeout(2)
        assert first[0].recv(100).startswith(b"HTTP/1.1 503 ")  # evicted, with a reason
        close_all(first + later)
    finally:
        svc.stop(5)


def test_at_the_connection_cap_answered_connections_make_room_before_waiting_ones(sqlite_url):
    """Connections lingering after their answer (here 404s to bodies that never come) are closed
    to make room before any connection still sending its head is turned away."""
    svc = start(open_store(sqlite_url), max_connections=40)
    answered, idle, later = [], [], []
    try:
        for _ in range(30):
            s = socket.create_connection(svc.address, timeout=5)
            s.sendall(b"POST /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            answered.append(s)
        idle = open_idle(svc.address, 10)
        time.sleep(0.1)
        later = open_idle(svc.address, 20)  # 60 in all: 20 must go
        time.sleep(0.1)
        assert svc.httpd.open_connections() <= 40
        for s in idle:
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(100)  # no 503: still held
        assert status_of(answered[0].recv(4096)) == 404
    finally:
        close_all(answered + idle + later)
        svc.stop(5)


@pytest.mark.parametrize(
    "head, status",
    [
        (b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(20)), 431),
        (b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * 9000, 431),
        (b"GET /" + b"a" * 9000, 414),
    ],
    ids=["block over 16 KiB", "line over 8 KiB", "request line over 8 KiB"],
)
def test_a_huge_unfinished_head_is_refused_at_once_and_closed(service, head, status):
    started = time.monotonic()
    answer = raw(service, head)  # never ends its head; the server answers and closes
    assert status_of(answer) == status and time.monotonic() - started < 1.0
    assert b"Traceback" not in answer


def test_a_head_within_the_limits_is_served(service):
    head = b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(14)) + b"\r\n"
    assert status_of(raw(service, head)) == 200
    assert post(service, lead_body(5))[0] == 200 and Event.select().count() == 1


def read_all(sock: socket.socket) -> bytes:
    answer = b""
    try:
        while chunk := sock.recv(4096):
            answer += chunk
    except ConnectionResetError:
        pass
    return answer


def test_a_refusal_answered_by_a_thread_is_lingered_over_by_the_event_loop(sqlite_url):
    """413 for a body announced too large is answered by a thread without reading the body; the
    thread must not then wait 0.5 s for what the client may still send (2 threads, 10 such
    requests one after the other: 2.5 s if each thread lingered)."""
    svc = start(open_store(sqlite_url), max_workers=2)
    held = []
    try:
        head = f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Length: {4 * 2**20}\r\n\r\n".encode()
        started = time.monotonic()
        for _ in range(10):
            s = socket.create_connection(svc.address, timeout=5)
            s.sendall(head)
            held.append(s)
            assert s.recv(4096).startswith(b"HTTP/1.1 413 ")  # the socket stays open: we may send on
        took = time.monotonic() - started
        assert took < 1.0, f"{took:.2f} s for 10 refusals"
        deadline = time.monotonic() + 0.3
        while svc.httpd.open_connections() != 10 and time.monotonic() < deadline:
            time.sleep(0.01)  # the last thread may still be handing its connection back
        assert svc.httpd.open_connections() == 10  # held by the event loop, lingering
        time.sleep(1.0)  # past the 0.5 s of lingering (and the sweep)
        assert svc.httpd.open_connections() == 0
        assert all(read_all(s) == b"" for s in held)  # closed after the answer, not reset
        assert timed_post(svc.address, 1)[0] == 200
    finally:
        close_all(held)
        svc.stop(5)


def test_requests_without_the_secret_may_take_only_their_share_of_the_threads(sqlite_url, monkeypatch):
    """Health checks that hang (here: until released) hold at most ``max_untrusted`` threads and
    wait in a line of their own (full: 503 at once), and a webhook still gets a thread and its 200
    at once."""
    from amohook.ops import health

    release = threading.Event()
    real_answer = health.answer

    def hanging(*args, **kwargs):
        release.wait(10)
        return real_answer(*args, **kwargs)

    monkeypatch.setattr(health, "answer", hanging)
    svc = start(open_store(sqlite_url), max_workers=4, max_untrusted=2, max_queued=5)
    answers: list[int] = []
    lock = threading.Lock()

    def healthz():
        status = status_of(raw(svc, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
        with lock:
            answers.append(status)

    checks = [threading.Thread(target=healthz) for _ in range(10)]
    try:
        for t in checks:
            t.start()
        deadline = time.monotonic() + 5
        while len(answers) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        assert answers == [503] * 3  # 2 hang in their threads, 5 wait, the line is full for the rest
        status, took = timed_post(svc.address, 1)
        assert status == 200 and took < 1.0
        assert len(answers) == 3  # the 7 still hang or wait
    finally:
        release.set()
        for t in checks:
            t.join(10)
        svc.stop(5)
    assert sorted(answers) == [200] * 7 + [503] * 3


@pytest.mark.slow
def test_trickling_heads_take_no_thread_and_are_cut_off_at_the_deadline(sqlite_url):
    svc = start(open_store(sqlite_url), socket_timeout=1.0, read_deadline=2.0)
    threads_before = threading.active_count()
    slow = []
    try:
        for _ in range(100):
            s = socket.create_connection(svc.address, timeout=5)
            s.sendall(b"POST /webhook/x HTTP/1.1\r\n")
            slow.append(s)
        started = time.monotonic()
        while time.monotonic() - started < 1.5:
            for s in slow:
                s.sendall(b"X")  # never silent for the 1 s timeout
            time.sleep(0.3)
        assert threading.active_count() - threads_before < 10
        assert timed_post(svc.address, 1)[0] == 200
        time.sleep(1.0)  # now past the 2 s whole-request deadline
        s = slow[0]
        answer = b""
        try:
            while chunk := s.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
        assert status_of(answer) == 408
    finally:
        svc.stop(5)
        close_all(slow)


# -- a real `amohook serve` under a small open-file limit -----------------------------------------
class LimitedServe:
    """`amohook serve` in a subprocess whose open-file limit is ``nofile``."""

    def __init__(self, db_url: str, nofile: int):
        def limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        env = cli_env(db_url, AMOHOOK_WEBHOOK_SECRET=SECRET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "amohook", "serve", "--port", "0", "--workers", "0", "--log-level", "warning"],
            env=env,
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=limit,
        )
        line = self.proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.address = ("127.0.0.1", int(match.group(1)))

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def threads(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@pytest.mark.slow
@pytest.mark.alone
def test_at_the_open_file_limit_the_listener_neither_spins_nor_drops_webhooks(sqlite_url):
    serve = LimitedServe(sqlite_url, nofile=256)
    idle = []
    try:
        assert timed_post(serve.address, 1)[0] == 200  # warm
        idle = open_idle(serve.address, 300)
        time.sleep(0.5)
        cpu0 = serve.cpu_seconds()
        time.sleep(2.0)
        spent = serve.cpu_seconds() - cpu0
        assert spent < 0.5, f"{spent:.2f} s of CPU in 2 s with 300 idle connections"
        statuses = [timed_post(serve.address, n) for n in range(2, 6)]
        assert all(status == 200 and took < 1.0 for status, took in statuses), statuses
    finally:
        close_all(idle)
        err = serve.stop()
    assert "Traceback" not in err


def test_huge_unfinished_heads_do_not_grow_the_listener(sqlite_url):
    serve = LimitedServe(sqlite_url, nofile=1024)
    try:
        assert timed_post(serve.address, 1)[0] == 200
        before = serve.rss_mib()
        line = b"X-Pad: " + b"a" * 60_000 + b"\r\n"  # each line under http.server's own 64 KiB

        def flood():
            try:
                with socket.create_connection(serve.address, timeout=5) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\n")
                    for _ in range(60):  # 3.6 MiB of header lines, never ending the head
                        s.sendall(line)
            except OSError:
                pass  # refused and closed: what should happen

        floods = [threading.Thread(target=flood) for _ in range(60)]
        for t in floods:
            t.start()
        peak = before
        while any(t.is_alive() for t in floods):
            peak = max(peak, serve.rss_mib())
            time.sleep(0.05)
        assert peak - before < 40, f"RSS grew from {before:.0f} to {peak:.0f} MiB"
        assert timed_post(serve.address, 2)[0] == 200
    finally:
        serve.stop()


EMFILE_SCRIPT = """
import json, logging, resource, subprocess, sys, tempfile, time
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from amohook.store import open_store
from amohook.webhooks.server import ServerConfig, WebhookService
from tests.helpers.listener import timed_post
logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
svc = WebhookService(open_store(sys.argv[1]), ServerConfig(secret=sys.argv[2], port=0)).start()
others = [open("/dev/null") for _ in range(120)]  # something else in the process holds files too
clients = subprocess.Popen([sys.executable, "-c", f'''
import resource, socket, time
resource.setrlimit(resource.RLIMIT_NOFILE, (2000, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
socks = [socket.create_connection(("127.0.0.1", {svc.address[1]})) for _ in range(300)]
time.sleep(5)
'''])
time.sleep(1.5)
cpu = time.process_time()
time.sleep(2.0)
cpu = time.process_time() - cpu
answers = [timed_post(svc.address, n) for n in range(1, 5)]
clients.kill()
svc.stop(5)
print(json.dumps({"cpu": cpu, "answers": answers}))
"""


@pytest.mark.slow
@pytest.mark.alone
def test_out_of_open_files_the_accept_loop_backs_off_and_makes_room(sqlite_url):
    """EMFILE for real: the process's other files and 300 connections exceed its limit of 256."""
    import json

    result = subprocess.run(
        [sys.executable, "-c", EMFILE_SCRIPT, sqlite_url, SECRET],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
        env=cli_env(sqlite_url),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["cpu"] < 0.5, figures  # no busy loop on EMFILE
    assert all(status == 200 and took < 1.0 for status, took in figures["answers"]), figures
    assert "out of open files (EMFILE)" in result.stderr and "Traceback" not in result.stderr


def linger_flood(address, rate: float, stop: threading.Event, senders: int = 3, hold: float = 3.0):
    """Secretless ``POST``s (a wrong secret, a route that wants GET, an unknown path) announcing a
    100,000-byte body that never comes, from ``senders`` threads at ``rate`` a second in all, each
    connection kept open ``hold`` seconds whatever the server does (so its lingering after the
    404/405 lasts as long as the server allows). Returns the threads and how many each sent."""
    heads = [
        f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".encode()
        for target in ("/webhook/wrong-secret-0123456789", "/healthz", "/nothing")
    ]
    sent = [0] * senders

    def sender(i: int) -> None:
        held: list[tuple[float, socket.socket]] = []
        next_at = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            while held and now - held[0][0] > hold:
                held.pop(0)[1].close()
            if now < next_at:
                time.sleep(next_at - now)
                continue
            next_at += senders / rate
            try:
                s = socket.create_connection(address, timeout=2)
                s.sendall(heads[sent[i] % len(heads)])
            except OSError:
                continue
            held.append((now, s))
            sent[i] += 1
        close_all(s for _, s in held)

    threads = [threading.Thread(target=sender, args=(i,), daemon=True) for i in range(senders)]
    for t in threads:
        t.start()
    return threads, sent


@pytest.mark.slow
@pytest.mark.alone
def test_a_flood_of_secretless_posts_with_an_unsent_body_does_not_delay_real_webhooks(sqlite_url):
    """Each such POST is answered 404/405 at once and its body lingered over for 0.5 s: that must
    not hold a handler thread (300 a second would need 150 of the 64), nor anything else a real
    webhook needs. amoCRM waits 2 s for its 200."""
    serve = LimitedServe(sqlite_url, nofile=1024)
    stop = threading.Event()
    try:
        assert timed_post(serve.address, 1)[0] == 200  # warm
        flooders, sent = linger_flood(serve.address, 300, stop)
        time.sleep(1.0)  # the flood is in full swing
        answers: dict[int, tuple[int, float]] = {}

        def webhook(n: int) -> None:
            try:
                answers[n] = timed_post(serve.address, n)
            except OSError:
                answers[n] = (0, float("inf"))  # no answer at all

        senders = []
        for n in range(2, 32):  # 30 webhooks over 3 s
            senders.append(threading.Thread(target=webhook, args=(n,)))
            senders[-1].start()
            time.sleep(0.1)
        for t in senders:
            t.join(10)
        threads = serve.threads()
        stop.set()
        for t in flooders:
            t.join(5)
        assert sum(sent) > 900, sent  # the flood did run at about 300 a second
        late = {n: a for n, a in answers.items() if a[0] != 200 or a[1] >= 2.0}
        assert len(answers) == 30 and not late, late
        assert threads < 32, threads  # the flood took no handler thread (before: all 64)
    finally:
        stop.set()
        err = serve.stop()
    assert "Traceback" not in err
