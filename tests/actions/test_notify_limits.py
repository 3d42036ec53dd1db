"""A notify receiver is somebody else's server (hardening round 2, #15.5): one that answers a byte
at a time, or answers a gigabyte, holds a message at most ``http_deadline`` and costs a few KiB
of reading — and never holds up what another rule does in amoCRM. Real local servers on
127.0.0.1, the fake amoCRM, every backend."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time

import pytest
import requests

from amohook.actions import ActionSender, record_planned
from amohook.actions.notify import MAX_ANSWER_BYTES
from amohook.amocrm.client import client_for
from amohook.store.models import Action
from tests.helpers.actions import notify, planned


class RawReceiver:
    """A TCP server that reads a request's head and answers as ``answer(conn)`` decides; counts
    connections, open ones, and the bytes it managed to send."""

    def __init__(self, answer, tls: ssl.SSLContext | None = None):
        self.answer = answer
        self.tls = tls
        self.sock = socket.create_server(("127.0.0.1", 0))
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.sock.getsockname()[1]}/hook/s3cr3t-token"
        self.connections = 0
        self.open = 0
        self.sent = 0
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        self.open += 1
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            self.answer(self, conn)
        except OSError:
            pass  # the client hung up: what we measure
        finally:
            self.open -= 1
            conn.close()

    def send(self, conn, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def close(self):
        self.closed.set()
        self.sock.close()


def trickle(receiver, conn):
    """The status line four bytes a second (each wait far below the read timeout), for minutes."""
    for byte in b"HTTP/1.1 200 OK\r\n" * 1000:
        if receiver.closed.is_set():
            return
        receiver.send(conn, bytes([byte]))
        time.sleep(0.25)


def huge(status: bytes):
    def answer(receiver, conn):
        size = 1 << 30  # 1 GiB offered
        receiver.send(conn, b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n" % size)
        block = (b"refused: the payload lacks a channel. " * 2000)[:65536]
        for _ in range(size // len(block)):
            if receiver.closed.is_set():
                return
            receiver.send(conn, block)

    return answer


@pytest.fixture
def receivers():
    made: list[RawReceiver] = []
    yield lambda answer, tls=None: made.append(RawReceiver(answer, tls)) or made[-1]
    for r in made:
        r.close()


def sender(store, url: str, deadline: float) -> ActionSender:
    return ActionSender(store, lambda sub: client_for(store, sub), env={"CHAT_URL": url}, http_deadline=deadline)


def wait_for(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["run", "drain"])
def test_a_trickling_receiver_holds_up_no_task_and_ends_at_the_deadline(store, fake, account, receivers, how):
    slow = receivers(trickle)
    record_planned(store, [notify(5)], event_id=1)  # first in line
    record_planned(store, [planned(5)], event_id=2)  # another rule's task, behind it
    s = sender(store, slow.url, deadline=2.0)
    stop = threading.Event()
    started = time.monotonic()
    worker = threading.Thread(target=s.run if how == "run" else s.drain, args=(stop,) if how == "run" else ())
    worker.start()
    try:
        # The task reaches amoCRM while the message is still stuck in the trickle.
        assert wait_for(lambda: slow.open == 1, 1.5)
        assert wait_for(lambda: len(fake.tasks) == 1, 1.5), "the task waited for the receiver"
        assert slow.open == 1 and Action.get(Action.kind == "notify").last_error is None
        # And the message gives up at the deadline, not after the ~21 minutes of its trickle.
        assert wait_for(lambda: Action.get(Action.kind == "notify").last_error is not None, 15.0)
        took = time.monotonic() - started
    finally:
        stop.set()
        worker.join(20)
    message = Action.get(Action.kind == "notify")
    assert 1.9 <= took < 10.0, took
    assert message.status == "sending" and message.last_error == "no answer within 2 s while posting to $CHAT_URL"
    assert Action.get(Action.kind == "create_task").status == "done"
    assert wait_for(lambda: slow.open == 0, 5.0)  # the connection was given up, not left trickling


def test_a_huge_answer_to_a_message_is_not_read(store, account, receivers):
    big = receivers(huge(b"200 OK"))
    record_planned(store, [notify(5)], event_id=1)
    s = sender(store, big.url, deadline=20.0)
    started = time.monotonic()
    s.drain()
    assert time.monotonic() - started < 10.0
    assert Action.get().status == "done"
    assert s.stats.answer_bytes == 0  # the status decides; the body is not read
    assert wait_for(lambda: big.open == 0, 5.0)
    assert big.sent < 64 << 20  # what the kernel's buffers took before the hang-up, of 1 GiB


def test_a_huge_refusal_is_read_only_far_enough_to_say_why(store, account, receivers):
    big = receivers(huge(b"400 Bad Request"))
    record_planned(store, [notify(5)], event_id=1)
    s = sender(store, big.url, deadline=20.0)
    s.drain()
    action = Action.get()
    assert action.status == "rejected"
    assert action.last_error.startswith("$CHAT_URL refused the message: HTTP 400 — refused: the payload lacks")
    assert len(action.last_error) < 300
    assert 0 < s.stats.answer_bytes <= MAX_ANSWER_BYTES
    assert wait_for(lambda: big.open == 0, 5.0)
    assert big.sent < 64 << 20


@pytest.mark.slow
def test_a_receiver_that_timed_out_rests_so_others_messages_go_first(store, account, receivers):
    """Three messages to a trickling receiver, then one to another: the other's is not queued
    behind three deadlines — after one, the slow receiver's messages wait their turn."""
    from tests.helpers.actions import Receiver

    slow = receivers(trickle)
    good = Receiver()
    try:
        for lead in (1, 2, 3):
            record_planned(store, [notify(lead)], event_id=lead)
        other = notify(4)
        other.payload["url_env"] = "OTHER_URL"
        record_planned(store, [other], event_id=4)
        s = ActionSender(
            store,
            lambda sub: client_for(store, sub),
            env={"CHAT_URL": slow.url, "OTHER_URL": good.url},
            http_deadline=1.5,
        )
        s.drain()
        assert len(good.messages) == 1 and slow.connections == 1  # one deadline spent, not three
        rows = {a.id: a for a in Action.select()}
        assert [rows[i].status for i in sorted(rows)] == ["sending", "sending", "sending", "done"]
        assert "no answer within 1.5 s" in rows[1].last_error
        assert all("$CHAT_URL did not answer in time: its messages wait" in rows[i].last_error for i in (2, 3))
        assert all(rows[i].attempts == 0 for i in (2, 3))  # waiting out another's timeout is no attempt
    finally:
        good.close()


@pytest.mark.slow
def test_the_deadline_holds_over_tls_too(store, account, receivers, tmp_path):
    """TLS takes the connection's socket over (the one first made is detached): the deadline
    must still end a trickling https receiver."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    slow = receivers(trickle, tls)
    session = requests.Session()
    session.verify = str(cert)
    session.trust_env = False  # else REQUESTS_CA_BUNDLE, if set, overrides verify (psf/requests#3829)
    record_planned(store, [notify(5)], event_id=1)
    s = ActionSender(
        store, lambda sub: client_for(store, sub), env={"CHAT_URL": slow.url}, http=session, http_deadline=1.5
    )
    worker = threading.Thread(target=s.drain, daemon=True)
    worker.start()
    worker.join(15.0)
    stuck = worker.is_alive()
    slow.close()
    assert not stuck, "the https request outlived its deadline"
    assert Action.get().last_error == "no answer within 1.5 s while posting to $CHAT_URL"


def test_a_receiver_silent_in_the_tls_handshake_ends_at_the_deadline(store, account, receivers):
    """The handshake is part of the exchange: a server that takes the connection and never
    answers the ClientHello is given up at the deadline, not at the 5 s connect timeout (which a
    handshake trickled a byte at a time would beat)."""
    silent = receivers(lambda receiver, conn: None)  # reads the "head" forever: a ClientHello has no blank line
    record_planned(store, [notify(5)], event_id=1)
    s = sender(store, silent.url.replace("http://", "https://"), deadline=1.0)
    started = time.monotonic()
    s.drain()
    took = time.monotonic() - started
    assert Action.get().last_error == "no answer within 1 s while posting to $CHAT_URL"
    assert took < 4.0, took
