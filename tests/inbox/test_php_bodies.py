"""Bodies PHP accepts are taken by the real listener, whatever their shape (a refused delivery
counts toward amoCRM switching the subscription off)."""

from __future__ import annotations

import http.client

import pytest

from amohook.store.models import Delivery, Event
from amohook.webhooks.server import ServerConfig, WebhookService

SECRET = "test-secret-0123456789"
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def service(store):
    svc = WebhookService(store, ServerConfig(secret=SECRET, port=0, socket_timeout=2.0, read_deadline=4.0)).start()
    yield svc
    svc.stop(5)


def post(svc, body: bytes) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*svc.address, timeout=10)
    try:
        conn.request("POST", f"/webhook/{SECRET}", body=body, headers={"Content-Type": FORM})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


LEAD = b"account[subdomain]=example&leads[status][0][id]=5001&leads[status][0][status_id]=142"


@pytest.mark.parametrize(
    "extra",
    [
        b"a[b]=2&a=1",  # a container replaced by a value
        b"a=2&a[b]=1",  # a value replaced by a container
        b"leads[status][0][name]junk=Acme",  # text after ']'
        b"leads%5Badd%5D%5B0=1",  # an unterminated bracket: leads[add] = "1", a bare-id item
        b"x" + b"[y]" * 70 + b"=1",  # deeper than PHP's 64 levels: dropped, as PHP drops it
        b"a]=1&[b]=2&=3&a.b c=4",  # names PHP reads its own way, or ignores
    ],
)
def test_a_body_php_accepts_is_stored_and_acknowledged(service, store, extra):
    status, text = post(service, LEAD + b"&" + extra)
    assert status == 200, text
    assert Delivery.select().count() == 1
    assert "5001" in [e.entity_id for e in Event.select().where(Event.entity == "leads")]


# -- bytes PHP takes and a database's text may not (issue 15 #15) -------------------------------
NOTE = b"account[subdomain]=example&leads[note][0][note][element_id]=5001&leads[note][0][note][id]=77"


@pytest.mark.parametrize(
    "text, shown",
    [
        (b"%D0%9F%D1%80%D0%B8%D0%B2%D0", "Прив\ufffd"),  # a note cut inside its last character
        (b"\xd0\x9f\xd1\x80\xd0", "Пр\ufffd"),  # the same, not percent-encoded
        (b"a%00b", "a\x00b"),  # an escaped NUL: the data keeps it (JSON writes it as \u0000)
        (b"a\x00b", "a\x00b"),  # a raw NUL
    ],
)
def test_a_body_that_is_not_utf8_or_holds_nul_is_stored_and_processed(service, store, text, shown):
    from amohook.worker import Registry, Worker

    body = NOTE + b"&leads[note][0][note][text]=" + text
    status, answer = post(service, body)
    assert (status, answer) == (200, "ok\n")
    assert post(service, body) == (200, "ok (already stored)\n")  # the resend is known by its bytes
    delivery = Delivery.get()
    # The body column holds text: what is not UTF-8, and NUL (PostgreSQL's text refuses it), as U+FFFD.
    assert delivery.times_received == 2
    assert delivery.body == body.decode("utf-8", "replace").replace("\x00", "\ufffd")
    seen = []
    registry = Registry()
    registry.register("h", lambda event, ctx: seen.append((event.entity_id, event.data["note"]["text"])))
    worker = Worker(store, registry, "w1")
    try:
        assert worker.run_once() == 1
    finally:
        worker.close()
    assert seen == [("77", shown)]
    assert Event.get().status == "done"


@pytest.mark.parametrize(
    "body, entity_id, account",
    [
        (b"leads[add][0][id]=1%002&account[subdomain]=ex%00ample", "1\ufffd2", "ex\ufffdample"),
        (b"leads[add][0][id]=1\x002&account[subdomain]=ex\xffample", "1\ufffd2", "ex\ufffdample"),
        (b"leads[add][0][id]=%FF", "\ufffd", None),
    ],
)
def test_nul_and_bad_bytes_in_an_id_are_stored_as_replacement_characters(service, store, body, entity_id, account):
    assert post(service, body) == (200, "ok\n")
    event = Event.get()
    assert (event.entity_id, event.account) == (entity_id, account)
