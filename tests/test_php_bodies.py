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
