"""GET /status and GET /metrics on the real listener: off without a password, Basic auth, headers,
escaping, one cached read, the Prometheus format — and the page as headless Chromium renders it."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from amohook.runtime.supervisor import Supervisor
from amohook.store.models import Action, Event
from amohook.webhooks.server import ServerConfig, WebhookService
from amohook.worker import Registry, Worker
from tests.conftest import ROOT, cli_env, run_cli
from tests.helpers.deliveries import lead_body
from tests.helpers.listener import HOOK, SECRET, post, request

PASSWORD = "correct-horse-battery-staple"
HOSTILE = "<script>alert(1)</script>"
ARTIFACTS = ROOT / "tests" / "artifacts"


def start(store, password: str | None = PASSWORD, runtime=None, **kw) -> WebhookService:
    config = ServerConfig(secret=SECRET, port=0, socket_timeout=2.0, read_deadline=4.0, status_password=password, **kw)
    return WebhookService(store, config, runtime=runtime).start()


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def get(svc, path: str, headers: dict | None = None):
    return request(svc, "GET", path, headers=headers)


def named_lead(lead_id: int, name: str) -> bytes:
    from urllib.parse import quote

    return (
        f"leads%5Badd%5D%5B0%5D%5Bid%5D={lead_id}&leads%5Badd%5D%5B0%5D%5Bname%5D={quote(name)}"
        "&account%5Bsubdomain%5D=example&account%5Bid%5D=42"
    ).encode()


@pytest.fixture
def sqlite_store(sqlite_url):
    from amohook.store import open_store

    s = open_store(sqlite_url)
    yield s
    s.close()


@pytest.fixture
def svc(sqlite_store):
    service = start(sqlite_store)
    yield service
    service.stop(5)


# -- off, auth, headers ------------------------------------------------------------------------
def test_without_the_password_both_routes_answer_404_like_an_unknown_path(sqlite_store):
    service = start(sqlite_store, password=None)
    try:
        for path in ("/status", "/metrics"):
            status, _, body = get(service, path, basic("admin", PASSWORD))
            assert (status, body) == (404, "not found\n")
        assert service.httpd.admin.reader.reads == 0
    finally:
        service.stop(5)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic("admin", "wrong-password-of-length"),
        basic("admin", PASSWORD[:-1]),
        basic("admin", PASSWORD + "x"),
        {"Authorization": "Bearer " + PASSWORD},
        {"Authorization": "Basic not-base64!"},
        {"Authorization": "Basic " + base64.b64encode(PASSWORD.encode()).decode()},  # no user:password colon
    ],
    ids=["none", "wrong", "prefix", "longer", "bearer", "garbage", "no-colon"],
)
def test_without_the_right_password_the_answer_is_401_and_nothing_is_read(svc, headers):
    for path in ("/status", "/metrics"):
        status, answer_headers, body = get(svc, path, headers)
        assert status == 401
        assert answer_headers["WWW-Authenticate"] == 'Basic realm="amohook"'
        assert answer_headers["Cache-Control"] == "no-store"
        assert "amohook status" not in body
    assert svc.httpd.admin.reader.reads == 0  # an unauthenticated request never touches the store


def test_any_user_name_with_the_password_gets_the_page_with_its_security_headers(svc):
    for user in ("admin", "", "someone"):
        status, headers, body = get(svc, "/status", basic(user, PASSWORD))
        assert status == 200
        assert headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    for directive in ("default-src 'none'", "frame-ancestors 'none'", "base-uri 'none'", "form-action 'none'"):
        assert directive in csp
    assert re.search(r"style-src 'sha256-[A-Za-z0-9+/=]+'", csp)
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-store"
    assert '<meta http-equiv="refresh" content="30">' in body
    assert "<script" not in body.lower()


def test_the_style_hash_in_the_csp_is_the_hash_of_the_page_style(svc):
    import hashlib

    _, headers, body = get(svc, "/status", basic("admin", PASSWORD))
    style = re.search(r"<style>(.*?)</style>", body, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in headers["Content-Security-Policy"]


def test_other_methods_get_405_and_head_gets_headers_only(svc):
    auth = basic("admin", PASSWORD)
    status, headers, _ = request(svc, "POST", "/status", b"", {**auth, "Content-Length": "0"})
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = request(svc, "HEAD", "/status", headers=auth)
    assert status == 200 and body == "" and int(headers["Content-Length"]) > 1000


def test_a_short_password_stops_serve_with_one_line_that_does_not_show_it(sqlite_url):
    env = cli_env(sqlite_url, AMOHOOK_WEBHOOK_SECRET=SECRET, AMOHOOK_STATUS_PASSWORD="tooshort99")
    result = run_cli(["serve", "--port", "0"], sqlite_url, env=env, timeout=30)
    assert result.returncode == 2
    assert "AMOHOOK_STATUS_PASSWORD is 10 characters; use at least 12" in result.stderr
    assert "tooshort99" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("password", "says"),
    [
        (" " * 12, "is only whitespace"),
        ("\t \n" * 5, "is only whitespace"),
        ("a" * 16, "repeats too few characters (1 different)"),
        ("abababababab", "repeats too few characters (2 different)"),
    ],
)
def test_a_weak_password_stops_serve_with_exit_2(sqlite_url, password, says):
    env = cli_env(sqlite_url, AMOHOOK_WEBHOOK_SECRET=SECRET, AMOHOOK_STATUS_PASSWORD=password)
    result = run_cli(["serve", "--port", "0"], sqlite_url, env=env, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert says in line and "token_urlsafe" in line and "Traceback" not in line
    if password.strip():
        assert password not in line


@pytest.mark.slow
def test_failed_passwords_are_slowed_down_per_address_and_summed_up_in_the_log(svc, caplog):
    """After ten failures an address gets 429 with Retry-After from the event loop (no thread, no
    password check: the right password is barred too), and the log has one line, not one per guess."""
    caplog.set_level(logging.DEBUG, logger="amohook")
    wrong = basic("admin", "not-the-password")
    for _ in range(10):
        assert get(svc, "/status", wrong)[0] == 401
    assert get(svc, "/metrics", wrong)[0] == 401  # the eleventh: barred from now on, 1 s
    status, headers, body = get(svc, "/status", basic("admin", PASSWORD))
    assert status == 429 and int(headers["Retry-After"]) >= 1 and "too many failed passwords" in body
    handled = svc.httpd.admin.reader.reads
    for _ in range(30):
        assert get(svc, "/metrics", wrong)[0] == 429
    assert svc.httpd.admin.reader.reads == handled
    time.sleep(1.2)
    assert get(svc, "/status", wrong)[0] == 401  # the bar ran out; the next failure bars for 2 s
    assert get(svc, "/status", basic("admin", PASSWORD))[0] == 429
    time.sleep(2.2)
    assert get(svc, "/status", basic("admin", PASSWORD))[0] == 200  # and a success clears the address
    assert get(svc, "/status", wrong)[0] == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "amohook.server"]
    assert not [line for line in lines if re.match(r"127\.0\.0\.1 \S+ /\S+ (401|429)$", line)], lines
    told = [line for line in lines if line.startswith("status pages:")]
    assert 1 <= len(told) <= 2, lines


def test_the_throttle_doubles_the_bar_forgets_quiet_addresses_and_bounds_its_memory():
    from amohook.ops.throttle import LoginThrottle, client_key

    now = [1000.0]
    throttle = LoginThrottle(free=3, max_delay=8, quiet=100, max_clients=5, clock=lambda: now[0])
    for _ in range(3):
        throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 0
    waits = []
    for _ in range(5):
        throttle.failed("10.0.0.1")
        waits.append(throttle.retry_after("10.0.0.1"))
    assert waits == [1, 2, 4, 8, 8]
    assert throttle.retry_after("10.0.0.2") == 0  # per address
    now[0] += 8 + 101  # quiet for longer than `quiet`: a fresh start
    throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 0
    # IPv6 per /64: one subscriber's addresses share one count.
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") != client_key("2001:db8:1:3::1")
    assert client_key("::ffff:10.0.0.1") == "10.0.0.1"
    for i in range(50):
        throttle.failed(f"192.0.2.{i}")
    assert len(throttle._clients) == 5


# -- what the page shows ---------------------------------------------------------------------
def failing_on_13(event, ctx):
    if event.entity_id == "13":
        raise RuntimeError("amoCRM said <b>no</b>")


def feed(svc, store, runner: Supervisor | None = None) -> None:
    """Webhooks through the listener, one of them run dead by a worker (``runner``'s, if given);
    rule actions in the store."""
    assert post(svc, named_lead(11, HOSTILE))[0] == 200
    assert post(svc, named_lead(12, "Квартира на Тверской"))[0] == 200
    assert post(svc, named_lead(13, "will fail"))[0] == 200
    if runner is not None:
        runner.run_once()
    else:
        registry = Registry()
        registry.register("h", failing_on_13)
        worker = Worker(store, registry, "status-test", max_attempts=1)
        try:
            while worker.run_once():
                pass
        finally:
            worker.close()
    now = time.time()
    event_id = Event.get(Event.entity_id == "11").id
    rows = [
        ("k1", "create_task", {"entity_id": 11, "text": "Call back <img src=x onerror=alert(2)>"}, "done", now),
        (
            "k2",
            "add_note",
            {"entity_id": 12, "note_type": "common", "params": {"text": "note from a rule"}},
            "done",
            now - 60,
        ),
        ("k3", "create_task", {"entity_id": 12, "text": "yesterday's task"}, "done", now - 2 * 86400),
        ("k4", "create_task", {"entity_id": 12, "text": "a failed task"}, "failed", now),
    ]
    with store.write():
        for key, kind, payload, status, at in rows:
            Action.create(
                key=key,
                account="example",
                rule="Follow-up <i>rule</i>",
                event_id=event_id,
                kind=kind,
                payload=json.dumps(payload),
                status=status,
                result_id=9001 if status == "done" else None,
                created_at=at,
                updated_at=at,
            )
    store.close()


def test_the_page_shows_the_store_and_escapes_what_came_from_outside(store, account):
    service = start(store)
    try:
        feed(service, store)
        status, _, body = get(service, "/status", basic("admin", PASSWORD))
    finally:
        service.stop(5)
    assert status == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body and HOSTILE not in body
    assert "&lt;img src=x onerror=alert(2)&gt;" in body and "<img" not in body
    assert "Follow-up &lt;i&gt;rule&lt;/i&gt;" in body
    assert "amoCRM said &lt;b&gt;no&lt;/b&gt;" in body
    assert "Квартира на Тверской" in body
    assert "Tasks and notes created today (2)" in body  # not yesterday's, not the failed one
    assert "yesterday&#x27;s task" not in body and "a failed task" not in body
    assert "Dead events (1)" in body
    assert ">example<" in body and "expires in 23h" in body


def test_the_store_is_read_once_for_requests_within_a_few_seconds(svc):
    auth = basic("admin", PASSWORD)
    first = [get(svc, path, auth)[0] for path in ("/status", "/metrics", "/status", "/status")]
    assert first == [200, 200, 200, 200]
    assert svc.httpd.admin.reader.reads == 1
    svc.httpd.admin.reader.fresh = 0.0  # stale at once: the next request reads again
    get(svc, "/status", auth)
    assert svc.httpd.admin.reader.reads == 2


def test_when_the_database_cannot_be_read_the_page_says_so(tmp_path):
    from amohook.store import open_store

    db = tmp_path / "gone.db"
    store = open_store(f"sqlite:///{db}")
    service = start(store)
    try:
        store.close()
        db.unlink()
        db.mkdir()  # the path is now a directory: every connection fails
        status, _, body = get(service, "/status", basic("admin", PASSWORD))
        m_status, _, metrics_text = get(service, "/metrics", basic("admin", PASSWORD))
    finally:
        service.stop(5)
    assert status == 503 and 'id="store-error"' in body and "Traceback" not in body
    assert m_status == 200 and "amohook_store_read_ok 0.0" in metrics_text


# -- /metrics --------------------------------------------------------------------------------
def families(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def value(family, **labels) -> float:
    for sample in family.samples:
        if sample.labels == labels and not sample.name.endswith(("_created", "_bucket")):
            return sample.value
    raise AssertionError(f"{family.name}{labels} not in {family.samples}")


def test_metrics_parse_and_count_webhooks_queue_actions_and_token(store, account):
    runner = Supervisor(store, handlers=[failing_on_13], max_attempts=1)
    service = start(store, runtime=runner.health)
    try:
        feed(service, store, runner)
        assert post(service, lead_body(500))[0] == 200
        assert post(service, lead_body(500))[0] == 200  # the same body again: "already stored", still 200
        assert post(service, lead_body(501), path="/webhook/wrong-secret-0123456789")[0] == 404
        assert post(service, b"{not json", content_type="application/json")[0] == 400
        status, headers, text = get(service, "/metrics", basic("admin", PASSWORD))
    finally:
        service.stop(5)
    assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    fams = families(text)
    webhooks = fams["amohook_webhooks"]
    assert webhooks.type == "counter"
    assert value(webhooks, code="200") == 5 and value(webhooks, code="404") == 1 and value(webhooks, code="400") == 1
    commit = fams["amohook_commit_seconds"]
    assert commit.type == "histogram"
    count = [s.value for s in commit.samples if s.name == "amohook_commit_seconds_count"][0]
    assert count >= 4  # one batch per delivery at this pace (the repeat is a commit too)
    events = fams["amohook_events"]
    assert value(events, status="dead") == 1 and value(events, status="done") == 2
    assert value(events, status="pending") == 1  # lead 500, not yet run
    actions = fams["amohook_actions"]
    assert value(actions, status="done") == 3 and value(actions, status="failed") == 1
    assert value(fams["amohook_actions_done_today"]) == 2
    expires = value(fams["amohook_token_expires_in_seconds"], account="example")
    assert 86000 < expires <= 86400
    assert value(fams["amohook_subscription_state"], account="example", state="unknown") == 1
    assert value(fams["amohook_store_read_ok"]) == 1
    processed = fams["amohook_events_processed"]
    assert value(processed, outcome="ok") == 2 and value(processed, outcome="dead") == 1  # the supervisor's
    assert "amohook_amocrm_requests" in fams and "amohook_amocrm_rate_limited" in fams


def test_metrics_count_the_supervisors_amocrm_requests_and_429s_per_account(store, account, fake):
    runner = Supervisor(store)
    fake.fail("/api/v4/account", status=429, retry_after=0)
    client = runner.clients.get("example", max_attempts=5)
    client.sleep = lambda s: None
    client.request("GET", "/api/v4/account")
    assert (client.requests_made, client.rate_limited) == (2, 1)
    service = start(store, runtime=runner.health)
    try:
        text = get(service, "/metrics", basic("admin", PASSWORD))[2]
    finally:
        service.stop(5)
    fams = families(text)
    assert value(fams["amohook_amocrm_requests"], account="example") == 2
    assert value(fams["amohook_amocrm_rate_limited"], account="example") == 1


# -- in a real browser ------------------------------------------------------------------------
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        reason = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("AMOHOOK_REQUIRE_BROWSER"):
            pytest.fail(f"{reason}, but AMOHOOK_REQUIRE_BROWSER is set")
        pytest.skip(reason)
    return path


def browse(binary: str, url: str, profile: Path, *extra: str) -> str:
    result = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url], capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_headless_chromium_renders_the_page_with_hostile_names_as_text(store, account, tmp_path, request):
    binary = chromium()
    service = start(store)
    try:
        feed(service, store)
        host, port = service.address
        url = f"http://admin:{PASSWORD}@{host}:{port}/status"  # top-level navigation: Chromium sends Basic auth
        dom = browse(binary, url, tmp_path / "profile", "--dump-dom")
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / f"status_page-{request.node.callspec.id}.png"
        shot.unlink(missing_ok=True)
        browse(binary, url, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,900", "--hide-scrollbars")
    finally:
        service.stop(5)
    print(f"screenshot: {shot}")
    # What the browser built: the hostile name is a text node (serialised escaped), no element.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "<script" not in dom.lower() and "<img" not in dom.lower()
    assert 'id="state"' in dom and "amohook status" in dom
    assert ">example<" in dom  # the account
    assert "Tasks and notes created today (2)" in dom and "Dead events (1)" in dom
    assert re.search(r"<dt>pending</dt><dd>0 \(0 due\)</dd>", dom)
    assert shot.exists() and shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chromium_without_credentials_gets_no_page(svc, tmp_path):
    binary = chromium()
    host, port = svc.address
    dom = browse(binary, f"http://{host}:{port}/status", tmp_path / "profile", "--dump-dom")
    assert "amohook status" not in dom  # headless Chromium gets the 401 and shows no page


@pytest.mark.slow
def test_serve_with_the_password_serves_both_and_never_logs_it(sqlite_url):
    import requests

    from tests.helpers.e2e import serve_until

    env = cli_env(
        sqlite_url, AMOHOOK_WEBHOOK_SECRET=SECRET, AMOHOOK_STATUS_PASSWORD=PASSWORD, AMOHOOK_LOG_LEVEL="debug"
    )
    seen = {}

    def work(url: str) -> None:
        hook = requests.post(
            f"{url}{HOOK}",
            data=named_lead(7, HOSTILE),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            timeout=5,
        )
        assert hook.status_code == 200
        seen["denied"] = requests.get(f"{url}/status", auth=("admin", "not-the-password"), timeout=10)
        seen["page"] = requests.get(f"{url}/status", auth=("admin", PASSWORD), timeout=10)
        seen["metrics"] = requests.get(f"{url}/metrics", auth=("admin", PASSWORD), timeout=10)

    written = serve_until(sqlite_url, ["--workers", "0"], env, work)
    assert seen["denied"].status_code == 401
    page = seen["page"]
    assert page.status_code == 200 and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert HOSTILE not in page.text
    assert value(families(seen["metrics"].text)["amohook_webhooks"], code="200") == 1
    assert "/status and" in written and "(HTTP Basic auth)" in written
    assert PASSWORD not in written
    assert base64.b64encode(f"admin:{PASSWORD}".encode()).decode() not in written
