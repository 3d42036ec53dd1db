"""The listener in-process over real sockets: routes, limits, answers, the OAuth redirect, stopping."""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import threading
import time
from urllib.parse import urlencode

import peewee
import pytest

from amohook import inbox
from amohook.store.models import Account, Delivery, Event
from amohook.webhooks import server as server_module
from amohook.webhooks.server import ServerConfig, check_secret
from tests.helpers.deliveries import FORM, fixture_body, lead_body
from tests.helpers.listener import HOOK, SECRET, post, raw, request, start, status_of


@pytest.fixture
def any_service(store):
    """The listener on every backend: for what depends on the store."""
    svc = start(store)
    yield svc
    svc.stop(5)


@pytest.fixture
def service(sqlite_url):
    """The listener on SQLite: for routes and limits, which do not depend on the store."""
    from amohook.store import open_store

    svc = start(open_store(sqlite_url))
    yield svc
    svc.stop(5)


@pytest.fixture
def sqlite_service(sqlite_url):
    from amohook.store import open_store

    svc = start(open_store(sqlite_url), commit_timeout=0.4, socket_timeout=1.0, read_deadline=2.0)
    yield svc
    svc.stop(5)


# -- the webhook route -------------------------------------------------------------------------
def test_a_webhook_is_stored_and_then_acknowledged(any_service):
    status, headers, text = post(any_service, fixture_body("01_lead_status_2016.txt"))
    assert (status, text) == (200, "ok\n") and headers["Connection"] == "close"
    (event,) = Event.select()
    assert (event.entity, event.action, event.entity_id) == ("leads", "status", "31926520")
    assert Delivery.get().remote_addr == "127.0.0.1"


def test_the_same_body_again_is_acknowledged_without_new_events(any_service):
    body = fixture_body("05_lead_add_2025.txt")
    assert post(any_service, body)[0] == 200
    assert post(any_service, body)[:3:2] == (200, "ok (already stored)\n")
    assert Event.select().count() == 1 and Delivery.get().times_received == 2


def test_a_ping_without_entity_items_is_stored_and_acknowledged(any_service):
    assert post(any_service, b"account%5Bsubdomain%5D=example")[0] == 200
    assert Delivery.select().count() == 1 and Event.select().count() == 0


def test_json_bodies_are_accepted(any_service):
    body = json.dumps({"leads": {"add": [{"id": "5"}]}, "account": {"subdomain": "example", "id": "1"}}).encode()
    assert post(any_service, body, content_type="application/json")[0] == 200
    assert Event.get().entity_id == "5"


@pytest.mark.parametrize(
    "path",
    [
        "/webhook/wrong-secret-0123456789",
        "/webhook/",
        "/webhook",
        f"/webhook/{SECRET}x",
        f"/webhook/{SECRET[:-1]}",
        f"/webhook/{SECRET.upper()}",
        f"/WEBHOOK/{SECRET}",
        f"/webhook/{SECRET}/extra",
    ],
)
def test_a_wrong_or_missing_secret_is_404_and_stores_nothing(service, path):
    assert post(service, lead_body(1), path=path)[0] == 404
    assert Delivery.select().count() == 0


def test_a_trailing_slash_or_query_after_the_secret_is_fine(service):
    assert post(service, lead_body(1), path=HOOK + "/")[0] == 200
    assert post(service, lead_body(2), path=HOOK + "?source=amo")[0] == 200
    assert Event.select().count() == 2


def test_other_methods_and_paths(service):
    status, headers, _ = request(service, "GET", HOOK)
    assert status == 405 and headers["Allow"] == "POST"
    assert request(service, "POST", "/healthz", b"")[0] == 405
    assert request(service, "DELETE", "/oauth/callback")[0] == 405
    assert request(service, "GET", "/")[0] == 404
    assert request(service, "HEAD", "/nothing")[::2] == (404, "")  # the head of the answer only
    assert request(service, "GET", "/webhooks")[0] == 404
    assert status_of(raw(service, b"BREW /webhook HTTP/1.1\r\nHost: x\r\n\r\n")) == 405


def test_a_body_without_content_length_is_411(service):
    answer = raw(service, f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\n\r\n".encode())
    assert status_of(answer) == 411
    chunked = raw(
        service, f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\na=1\r\n0\r\n\r\n".encode()
    )
    assert status_of(chunked) == 411


@pytest.mark.parametrize("value", ["abc", "-5", "1e3", "5, 5", " ", "99999999999999999999"])
def test_an_invalid_content_length_is_400(service, value):
    answer = raw(service, f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Length: {value}\r\n\r\n".encode())
    assert status_of(answer) == 400


def test_a_body_over_the_limit_is_413_without_reading_it(service):
    started = time.monotonic()
    answer = raw(service, f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Length: {2**20 + 1}\r\n\r\n".encode())
    assert status_of(answer) == 413 and b"larger than 1048576" in answer
    assert time.monotonic() - started < 2  # answered at once, not after a read timeout
    # A client that reads while it sends (as curl does) sees the 413 although it sent more.
    with socket.create_connection(service.address, timeout=5) as sock:
        sock.sendall(f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Length: {3 * 2**20}\r\n\r\n".encode())

        def send_body():
            try:
                sock.sendall(b"x" * (3 * 2**20))
            except OSError:
                pass  # the server stopped reading after a bounded part

        sender = threading.Thread(target=send_body)
        sender.start()
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
        sender.join(5)


def test_a_body_of_exactly_the_limit_is_read(store):
    svc = start(store, max_body=4096)
    try:
        body = lead_body(1)
        body += b"&pad=" + b"x" * (4096 - len(body) - 5)
        assert len(body) == 4096 and post(svc, body)[0] == 200
        assert post(svc, body + b"x")[0] == 413
    finally:
        svc.stop(5)


def test_unreadable_bodies_get_400_with_a_short_reason(service):
    status, _, text = post(service, b"{nope", content_type="application/json")
    assert status == 400 and text.startswith("invalid JSON: Expecting property name") and text.endswith("column 2\n")
    assert Delivery.select().count() == 0


def test_other_content_types_get_415(service):
    assert post(service, lead_body(1), content_type="text/plain")[0] == 415
    assert post(service, lead_body(1), content_type="multipart/form-data; boundary=x")[0] == 415
    assert post(service, lead_body(1), content_type=None)[0] == 200  # amoCRM always sends form


def test_expect_100_continue_is_answered_at_once(service):
    body = fixture_body("05_lead_add_2025.txt")
    head = (
        f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\nContent-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection(service.address, timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert status_of(answer) == 200 and Event.select().count() == 1


def test_expect_100_for_a_request_that_will_be_refused_gets_the_final_answer(service):
    head = (
        "POST /webhook/wrong-secret-0123456789 HTTP/1.1\r\n"
        "Host: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n"
    )
    assert status_of(raw(service, head.encode())) == 404
    head = f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Length: {2**21}\r\nExpect: 100-continue\r\n\r\n"
    assert status_of(raw(service, head.encode())) == 413


@pytest.mark.slow
def test_a_silent_client_gets_408_after_the_socket_timeout(sqlite_service):
    started = time.monotonic()
    answer = raw(sqlite_service, f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nleads".encode())
    assert status_of(answer) == 408 and 0.8 < time.monotonic() - started < 3
    assert status_of(raw(sqlite_service, b"POST /webhook/x HT")) == 408


@pytest.mark.slow
def test_a_trickling_client_is_cut_off_at_the_read_deadline(sqlite_service):
    with socket.create_connection(sqlite_service.address, timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(f"POST {HOOK} HTTP/1.1\r\n".encode())
        answer = b""
        try:
            for _ in range(40):  # one header byte every 0.3 s: never silent for the 1 s socket timeout
                sock.sendall(b"X")
                time.sleep(0.3)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(5)
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert status_of(answer) == 408
    assert time.monotonic() - started < 10


def test_protocol_errors_get_a_4xx_status_line_and_no_traceback(service):
    for data, expected in [
        (b"HELLO\r\n\r\n", 400),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X%d: 1\r\n" % i for i in range(150)) + b"\r\n", 431),
    ]:
        answer = raw(service, data)
        assert status_of(answer) == expected and b"Traceback" not in answer


# -- failures of the store ---------------------------------------------------------------------
def test_a_store_that_fails_answers_503_never_200(any_service, monkeypatch):
    def broken(store, items):
        raise peewee.OperationalError("database is locked")

    monkeypatch.setattr(inbox.receive, "store_deliveries", broken)  # what the writer calls
    status, _, text = post(any_service, lead_body(1))
    assert status == 503 and "retry later" in text and "locked" not in text


def test_a_commit_that_takes_too_long_answers_503_and_the_resend_is_deduplicated(sqlite_service, sqlite_url):
    locker = sqlite3.connect(sqlite_url[len("sqlite:///") :], timeout=0, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another process holds SQLite's write lock
    try:
        first, second = lead_body(1), lead_body(2)
        answers = {}
        t = threading.Thread(target=lambda: answers.update(first=post(sqlite_service, first)[0]))
        t.start()
        time.sleep(0.1)  # the writer has taken `first` and waits for the lock
        answers["second"] = post(sqlite_service, second)[0]  # queued behind it, then withdrawn
        t.join()
        assert answers == {"first": 503, "second": 503}
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    deadline = time.monotonic() + 5
    while Delivery.select().count() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    shas = {d.body_sha256 for d in Delivery.select()}
    assert shas == {inbox.Incoming(first, None).sha256}  # the in-flight commit landed; the withdrawn one did not
    # amoCRM resends both after its 503s: exactly one event each.
    assert post(sqlite_service, first)[2] == "ok (already stored)\n"
    assert post(sqlite_service, second)[2] == "ok\n"
    assert sorted(e.entity_id for e in Event.select()) == ["1", "2"]


def test_a_bug_answers_500_without_a_traceback(service, monkeypatch):
    def bug(body, content_type):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(server_module, "parse_webhook", bug)
    status, _, text = post(service, lead_body(1))
    assert (status, text) == (500, "internal error\n")
    assert request(service, "GET", "/healthz")[0] == 200  # and it keeps serving


# -- health ------------------------------------------------------------------------------------
def test_healthz_reports_the_queue(any_service):
    post(any_service, lead_body(1, items=2))
    status, headers, text = request(any_service, "GET", "/healthz")
    health = json.loads(text)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert health["status"] == "ok" and health["database"] == "ok"
    assert (health["queue_depth"], health["pending"], health["running"], health["dead"]) == (2, 2, 0, 0)
    assert 0 <= health["oldest_pending_age"] < 5
    assert request(any_service, "HEAD", "/healthz")[:3:2] == (200, "")


def test_healthz_reads_while_another_process_holds_the_write_lock(sqlite_service, sqlite_url):
    locker = sqlite3.connect(sqlite_url[len("sqlite:///") :], timeout=0, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        assert request(sqlite_service, "GET", "/healthz")[0] == 200
        assert time.monotonic() - started < 1
    finally:
        locker.execute("ROLLBACK")
        locker.close()


def test_healthz_says_503_when_the_database_fails(service, monkeypatch):
    def broken(store, now):
        raise peewee.OperationalError(
            "could not connect to server: Connection refused. Is the server running on "
            'host "db.internal" (10.0.0.7) and accepting TCP/IP connections on port 5432?'
        )

    monkeypatch.setattr(inbox, "queue_stats", broken)
    status, _, text = request(service, "GET", "/healthz")
    health = json.loads(text)
    assert status == 503 and health["status"] == "error" and health["database"] == "error: database unreachable"
    assert "db.internal" not in text and "10.0.0.7" not in text and "5432" not in text


@pytest.mark.slow
def test_a_full_disk_makes_healthz_degraded_and_the_log_names_it(sqlite_url, caplog):
    """A real SQLITE_FULL: the store may not grow past a few pages (max_page_count, given to every
    connection the writer opens), then it may again."""
    from amohook.store import open_store

    store = open_store(sqlite_url)
    pages = store.db.execute_sql("PRAGMA page_count").fetchone()[0]
    store.db.pragma("max_page_count", pages + 2, permanent=True)
    store.close()
    svc = start(store)
    try:
        caplog.set_level(logging.INFO)
        answers = [post(svc, lead_body(n, items=20))[0] for n in range(1, 30)]
        assert 503 in answers and 200 not in answers[answers.index(503) :]
        status, _, text = request(svc, "GET", "/healthz")
        health = json.loads(text)
        assert status == 503 and health["status"] == "degraded" and health["commits"] == "failing: disk full"
        logged = [r.getMessage() for r in caplog.records if r.name == "amohook.inbox"]
        assert any("disk full" in m and "database or disk is full" in m for m in logged), logged
        assert not any("cannot rollback" in m for m in logged)
        # Space again: the next commit works, and /healthz says so.
        store.db.pragma("max_page_count", 1_000_000, permanent=True)
        assert post(svc, lead_body(999))[0] == 200
        status, _, text = request(svc, "GET", "/healthz")
        assert status == 200 and json.loads(text)["status"] == "ok"
        assert any("succeed again" in r.getMessage() for r in caplog.records)
    finally:
        svc.stop(5)


def test_healthz_opens_no_database_connection_per_request(tmp_path):
    """150 monitors at once against a PostgreSQL store: the server's connection count stays put."""
    from amohook.store import open_store
    from tests.conftest import POSTGRES_URL, _pg_admin, make_database

    url, drop = make_database("postgres", tmp_path)
    store = open_store(url)
    svc = start(store)
    name = url.rsplit("/", 1)[1]
    admin = _pg_admin(POSTGRES_URL)

    def connections() -> int:
        with admin.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,))
            return cur.fetchone()[0]

    try:
        assert request(svc, "GET", "/healthz")[0] == 200
        before = connections()
        barrier = threading.Barrier(150)
        answers: list[int] = []
        peak = [before]

        def ask():
            barrier.wait()
            answers.append(request(svc, "GET", "/healthz")[0])

        threads = [threading.Thread(target=ask) for _ in range(150)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak[0] = max(peak[0], connections())
            time.sleep(0.01)
        assert answers == [200] * 150
        assert peak[0] <= before + 1, (before, peak[0])  # at most the one reading thread
    finally:
        svc.stop(5)
        store.close()
        admin.close()
        drop()


# -- the OAuth redirect ------------------------------------------------------------------------
@pytest.fixture
def auth_state(store, fake):
    from amohook.amocrm.oauth import Client
    from amohook.auth import start_authorization

    _, state = start_authorization(
        store, client=Client(fake.client_id, fake.client_secret, fake.redirect_uri), base_url=fake.base_url
    )
    return state


def callback(svc, **params):
    return request(svc, "GET", "/oauth/callback?" + urlencode(params))


def test_the_oauth_redirect_completes_the_authorization(any_service, fake, auth_state):
    status, headers, page = callback(any_service, code=fake.issue_code(), state=auth_state, referer="example.amocrm.ru")
    assert status == 200 and "amohook is connected" in page and "example" in page
    assert headers["Cache-Control"] == "no-store" and headers["Content-Type"].startswith("text/html")
    account = Account.get(Account.subdomain == "example")
    assert account.access_token and account.amo_account_id == fake.account_id
    # The same redirect again (a reload) is refused: the state is spent.
    status, _, page = callback(any_service, code=fake.issue_code(), state=auth_state, referer="example.amocrm.ru")
    assert status == 400 and "already completed" in page


def test_the_oauth_redirect_explains_what_went_wrong(any_service, fake, auth_state):
    status, _, page = callback(any_service, error="access_denied", state=auth_state)
    assert status == 400 and "Access was not granted" in page
    status, _, page = callback(any_service, code="x", state="unknown-state", referer="example.amocrm.ru")
    assert status == 400 and "unknown authorization state" in page
    status, _, page = callback(any_service)
    assert status == 400 and "amohook auth-url" in page
    status, _, page = callback(any_service, error="<script>alert(1)</script>")
    assert status == 400 and "<script>" not in page and "&lt;script&gt;" in page
    assert Account.select().count() == 0


def test_a_refused_code_is_explained_on_the_page(any_service, fake, auth_state):
    status, _, page = callback(any_service, code="not-a-real-code", state=auth_state, referer="example.amocrm.ru")
    assert status == 400 and "Authorization failed" in page and "Traceback" not in page


# -- configuration, workers and stopping -------------------------------------------------------
@pytest.mark.parametrize(
    "secret, message",
    [
        (None, "AMOHOOK_WEBHOOK_SECRET"),
        ("", "AMOHOOK_WEBHOOK_SECRET"),
        ("short", "at least 16"),
        ("with/slash-0123456789", "letters, digits"),
    ],
)
def test_the_secret_must_be_long_and_url_safe(secret, message):
    from amohook.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        check_secret(secret)


def test_worker_threads_in_the_listener_process_events_as_they_arrive(store):
    from amohook.runtime.supervisor import Supervisor

    done = threading.Event()
    seen = []

    def handler(event, ctx):
        seen.append(event.entity_id)
        done.set()

    # Polling only every 30 s: only the commit's wake-up can be in time.
    runner = Supervisor(
        store, handlers=[handler], listen=ServerConfig(secret=SECRET, port=0), poll_interval=30, keep=None
    )
    runner.start()
    try:
        time.sleep(0.3)  # the worker has looked once and now sleeps until woken
        assert runner.service is not None
        post(runner.service, lead_body(77))
        assert done.wait(5) and seen == ["77"]
    finally:
        runner.stop()
    deadline = time.monotonic() + 2
    while Event.get().status != "done" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert Event.get().status == "done"


def test_stop_answers_the_request_already_read_then_refuses_connections(sqlite_url):
    from amohook.store import open_store

    store = open_store(sqlite_url)
    svc = start(store)
    address = svc.address
    locker = sqlite3.connect(sqlite_url[len("sqlite:///") :], timeout=0, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # hold the commit back so the request is in flight during stop
    answer = {}
    t = threading.Thread(target=lambda: answer.update(status=post(svc, lead_body(1))[0]))
    t.start()
    time.sleep(0.2)
    stopper = threading.Thread(target=svc.stop, args=(9.0,))
    stopper.start()
    time.sleep(0.2)
    locker.execute("ROLLBACK")
    locker.close()
    t.join(5)
    stopper.join(10)
    assert answer == {"status": 200} and Event.select().count() == 1
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=1).close()


# -- `amohook serve` refuses to start without what it needs ------------------------------------
def test_serve_refuses_to_start_with_a_short_secret(sqlite_url):
    """Without any secret `serve` keeps one in the store instead (tests/webhooks/test_webhook_url.py)."""
    from tests.conftest import cli_env, run_cli

    short = run_cli(["serve", "--port", "0"], sqlite_url, env=cli_env(sqlite_url, AMOHOOK_WEBHOOK_SECRET="short"))
    assert short.returncode == 2 and "at least 16" in short.stderr


def test_serve_says_when_the_port_is_taken(sqlite_url):
    from tests.conftest import cli_env, run_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            ["serve", "--port", str(port)], sqlite_url, env=cli_env(sqlite_url, AMOHOOK_WEBHOOK_SECRET=SECRET)
        )
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
