"""The OAuth redirect over real HTTP against the fake amoCRM: only the admin's own, well-formed GET
spends the authorization; previews (HEAD) and malformed redirects leave it usable; the page
carries headers that keep it out of caches, frames and other sites."""

from __future__ import annotations

import http.client
from urllib.parse import urlencode

import pytest

from amohook.store.models import Account, OAuthState
from amohook.webhooks.server import ServerConfig, WebhookService

SECRET = "test-secret-0123456789"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@pytest.fixture
def service(store):
    svc = WebhookService(store, ServerConfig(secret=SECRET, port=0, socket_timeout=2.0, read_deadline=4.0)).start()
    yield svc
    svc.stop(5)


@pytest.fixture
def auth_state(store, fake):
    from amohook.amocrm.oauth import Client
    from amohook.auth import start_authorization

    _, state = start_authorization(
        store, client=Client(fake.client_id, fake.client_secret, fake.redirect_uri), base_url=fake.base_url
    )
    return state


def callback(svc, method: str = "GET", **params):
    conn = http.client.HTTPConnection(*svc.address, timeout=10)
    try:
        conn.request(method, "/oauth/callback?" + urlencode(params))
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def token_requests(fake) -> int:
    return len(fake.requests_to("/oauth2/access_token"))


def test_a_head_request_changes_nothing_and_the_get_still_completes(service, store, fake, auth_state):
    code = fake.issue_code()
    status, headers, body = callback(service, "HEAD", code=code, state=auth_state, referer="example.amocrm.ru")
    assert status == 200 and body == "" and headers["Content-Type"].startswith("text/html")
    assert token_requests(fake) == 0 and Account.select().count() == 0
    assert OAuthState.get(OAuthState.state == auth_state).used_at is None

    status, _, page = callback(service, code=code, state=auth_state, referer="example.amocrm.ru")
    assert status == 200 and "amohook is connected" in page, page
    assert Account.get(Account.subdomain == "example").access_token


@pytest.mark.parametrize("referer", ["", "evil.example.com", "exa mple.amocrm.ru", "<script>"])
def test_a_bad_referer_is_refused_without_spending_the_state(service, store, fake, auth_state, referer):
    code = fake.issue_code()
    status, _, page = callback(service, code=code, state=auth_state, referer=referer)
    assert status == 400 and "Authorization failed" in page and "<script>" not in page
    assert token_requests(fake) == 0
    assert OAuthState.get(OAuthState.state == auth_state).used_at is None

    status, _, page = callback(service, code=code, state=auth_state, referer="example.amocrm.ru")
    assert status == 200 and "amohook is connected" in page, page


def test_a_missing_code_does_not_spend_the_state(service, store, fake, auth_state):
    status, _, _ = callback(service, code="", state=auth_state, referer="example.amocrm.ru")
    assert status == 400
    assert OAuthState.get(OAuthState.state == auth_state).used_at is None


def test_every_page_carries_the_security_headers(service, store, fake, auth_state):
    answers = [
        callback(service, "HEAD", code="x", state=auth_state, referer="example.amocrm.ru"),
        callback(service, error="access_denied", state=auth_state),
        callback(service, code="x", state="unknown-state", referer="example.amocrm.ru"),
        callback(service, code=fake.issue_code(), state=auth_state, referer="example.amocrm.ru"),
    ]
    assert [status for status, _, _ in answers] == [200, 400, 400, 200]
    for _, headers, _ in answers:
        assert {name: headers.get(name) for name in PAGE_HEADERS} == PAGE_HEADERS
