"""The fake amoCRM behaves like the real one (as far as docs/amocrm.md knows it), over real HTTP."""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.fakes import FakeAmo

FIXTURES = Path(__file__).parents[1] / "fixtures" / "api"
TIMEOUT = 5


class Clock:
    def __init__(self, now: float = 1_750_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fixture(name: str):
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def token_request(fake: FakeAmo, form: bool = False, **params) -> requests.Response:
    body = {
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
        "redirect_uri": fake.redirect_uri,
        **params,
    }
    kwargs = {"data": body} if form else {"json": body}
    return requests.post(f"{fake.base_url}/oauth2/access_token", timeout=TIMEOUT, **kwargs)


def api(fake: FakeAmo, token: str, path: str, method: str = "GET", **kwargs) -> requests.Response:
    kwargs.setdefault("timeout", TIMEOUT)
    return requests.request(method, fake.base_url + path, headers={"Authorization": f"Bearer {token}"}, **kwargs)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def fake(clock):
    with FakeAmo(clock=clock) as f:
        yield f
        assert not f.errors, f.errors


# ------------------------------------------------------------------ OAuth
def test_code_exchange_once_then_revoked(fake):
    code = fake.issue_code()
    first = token_request(fake, grant_type="authorization_code", code=code)
    assert first.status_code == 200
    body = first.json()
    assert set(body) == set(fixture("oauth_token_response.json"))
    assert body["token_type"] == "Bearer" and body["expires_in"] == 86400
    assert len(body["access_token"]) > 300 and len(body["refresh_token"]) > 255
    claims = body["access_token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    assert claims["account_id"] == fake.account_id and claims["exp"] == int(fake._clock()) + 86400
    assert claims["api_domain"]
    assert api(fake, body["access_token"], "/api/v4/account").status_code == 200

    again = token_request(fake, grant_type="authorization_code", code=code)
    assert again.status_code == 400
    assert again.json() == fixture("oauth_error_code_revoked.json")
    assert again.headers["Content-Type"] == "application/problem+json"
    assert fake.code_calls == 2 and fake.refresh_calls == 0


def test_unknown_and_expired_code(fake, clock):
    r = token_request(fake, grant_type="authorization_code", code="garbage")
    assert (r.status_code, r.json()["hint"]) == (400, "Cannot decrypt the authorization code")
    code = fake.issue_code()
    clock.advance(1201)
    r = token_request(fake, grant_type="authorization_code", code=code)
    assert (r.status_code, r.json()["hint"]) == (400, "Authorization code has expired")
    short = fake.issue_code(ttl=10)
    clock.advance(9)
    assert token_request(fake, grant_type="authorization_code", code=short).status_code == 200


def test_refresh_rotates_and_old_refresh_is_revoked(fake):
    access, refresh = fake.issue_tokens()
    r = token_request(fake, grant_type="refresh_token", refresh_token=refresh)
    assert r.status_code == 200
    new = r.json()
    assert new["refresh_token"] != refresh and new["access_token"] != access
    assert fake.token_state(refresh) == "used"
    assert fake.token_state(access) == "valid"  # documented choice: old access lives until expiry
    again = token_request(fake, grant_type="refresh_token", refresh_token=refresh)
    assert again.status_code == 401
    assert again.json() == fixture("oauth_error_refresh_token_revoked.json")
    assert token_request(fake, grant_type="refresh_token", refresh_token=new["refresh_token"]).status_code == 200
    assert fake.refresh_calls == 3


def test_form_encoded_token_request(fake):
    _, refresh = fake.issue_tokens()
    r = token_request(fake, form=True, grant_type="refresh_token", refresh_token=refresh)
    assert r.status_code == 200 and r.json()["access_token"]
    assert fake.requests_to("/oauth2/")[-1].form["grant_type"] == "refresh_token"


def test_wrong_secret_and_redirect_uri(fake):
    _, refresh = fake.issue_tokens()
    r = token_request(fake, grant_type="refresh_token", refresh_token=refresh, client_secret="nope")
    assert (r.status_code, r.json()["hint"], r.json()["title"]) == (
        401,
        "Client authentication failed",
        "Некорректный запрос",
    )
    r = token_request(fake, grant_type="refresh_token", refresh_token=refresh, redirect_uri=fake.redirect_uri + "/")
    assert r.status_code == 400 and "hint" not in r.json()
    assert r.json()["detail"] == "В запросе отсутствует ряд параметров или параметры невалидны"
    assert fake.token_state(refresh) == "valid"  # failed requests spend nothing


def test_expired_revoked_and_missing_token_get_401(fake, clock):
    access, refresh = fake.issue_tokens()
    long_lived = fake.issue_long_lived_token()
    assert api(fake, long_lived, "/api/v4/account").status_code == 200
    fake.expire_access_tokens()
    r = api(fake, access, "/api/v4/account")
    assert r.status_code == 401 and set(r.json()) == set(fixture("api_error_401_unauthorized.json"))
    assert r.json()["title"] == "Unauthorized"
    assert api(fake, long_lived, "/api/v4/account").status_code == 401
    assert requests.get(fake.base_url + "/api/v4/account", timeout=TIMEOUT).status_code == 401

    access2, _ = fake.issue_tokens()
    clock.advance(86400)
    assert api(fake, access2, "/api/v4/account").status_code == 401

    access3, refresh3 = fake.issue_tokens()
    fake.revoke_all()
    assert api(fake, access3, "/api/v4/account").status_code == 401
    r = token_request(fake, grant_type="refresh_token", refresh_token=refresh3)
    assert (r.status_code, r.json()["hint"]) == (401, "Token has been revoked")


# ------------------------------------------------------------------ API data
def test_account_with_task_types_and_datetime_settings(fake):
    access, _ = fake.issue_tokens()
    plain = api(fake, access, "/api/v4/account").json()
    assert plain["id"] == 1231414 and plain["subdomain"] == "example" and "_embedded" not in plain
    full = api(fake, access, "/api/v4/account", params={"with": "task_types,datetime_settings"}).json()
    assert [t["id"] for t in full["_embedded"]["task_types"]] == [1, 2]
    assert full["_embedded"]["datetime_settings"]["timezone"] == "Europe/Moscow"
    fake.add_task_type("Перезвонить", type_id=77)
    full = api(fake, access, "/api/v4/account?with=task_types").json()
    assert full["_embedded"]["task_types"][-1] == {
        "id": 77,
        "name": "Перезвонить",
        "color": None,
        "icon_id": None,
        "code": None,
    }


def test_pipelines_have_system_statuses_in_every_pipeline(fake):
    access, _ = fake.issue_tokens()
    added = fake.add_pipeline("Продажи 2", ["Новая", "Переговоры"])
    r = api(fake, access, "/api/v4/leads/pipelines")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/hal+json"
    pipelines = r.json()["_embedded"]["pipelines"]
    assert [p["name"] for p in pipelines] == ["Воронка", "Продажи 2"] and r.json()["_total_items"] == 2
    for p in pipelines:
        statuses = p["_embedded"]["statuses"]
        assert statuses[0]["type"] == 1 and [s["id"] for s in statuses[-2:]] == [142, 143]
        assert all(s["pipeline_id"] == p["id"] for s in statuses)
    names = [s["name"] for s in pipelines[1]["_embedded"]["statuses"]]
    assert names == ["Неразобранное", "Новая", "Переговоры", "Успешно реализовано", "Закрыто и не реализовано"]
    ids = [s["id"] for p in pipelines for s in p["_embedded"]["statuses"] if s["id"] not in (142, 143)]
    assert len(ids) == len(set(ids)) and added["id"] == pipelines[1]["id"]


def test_users_paging_204_past_the_end_and_403_for_non_admin(fake):
    for n in range(3):
        fake.add_user(f"User {n}")
    access, _ = fake.issue_tokens()
    url, seen, pages = fake.base_url + "/api/v4/users?limit=2", [], 0
    while url:
        r = requests.get(url, headers={"Authorization": f"Bearer {access}"}, timeout=TIMEOUT)
        assert r.status_code == 200
        body = r.json()
        pages += 1
        assert body["_page"] == pages and body["_page_count"] == 3 and body["_total_items"] == 5
        seen += [u["id"] for u in body["_embedded"]["users"]]
        url = body["_links"].get("next", {}).get("href")
        assert url is None or url.startswith(fake.base_url)
    assert pages == 3 and seen == [u["id"] for u in fake.users]
    past = api(fake, access, "/api/v4/users", params={"limit": 2, "page": 4})
    assert past.status_code == 204 and past.content == b""
    assert api(fake, access, "/api/v4/users", params={"limit": 251}).status_code == 400

    user_token, _ = fake.issue_tokens(admin=False)
    r = api(fake, user_token, "/api/v4/users")
    assert r.status_code == 403 and r.json()["title"] == "Forbidden"
    assert api(fake, user_token, "/api/v4/leads/pipelines").status_code == 200


def test_custom_fields_and_lead_by_id(fake):
    access, _ = fake.issue_tokens()
    fake.add_custom_field("Город")
    r = api(fake, access, "/api/v4/leads/custom_fields", params={"limit": 1, "page": 2})
    assert r.json()["_embedded"]["custom_fields"][0]["name"] == "Город"
    lead = fake.add_lead("Сделка", 3177727, 142, 581651, price=100)
    r = api(fake, access, f"/api/v4/leads/{lead['id']}")
    assert r.json()["status_id"] == 142 and r.json()["price"] == 100
    assert api(fake, access, "/api/v4/leads/1").status_code == 204


# ------------------------------------------------------------------ tasks
def test_post_tasks_validation_failure_creates_nothing(fake):
    access, _ = fake.issue_tokens()
    good = {"text": "Позвонить", "complete_till": 1_750_100_000, "entity_id": 3912171, "entity_type": "leads"}
    bad = {**good, "task_type_id": 999, "request_id": "bad-one"}
    r = api(fake, access, "/api/v4/tasks", "POST", json=[good, bad])
    assert r.status_code == 400
    body = r.json()
    assert set(body) == set(fixture("api_error_400_validation.json"))
    assert body["validation-errors"] == [
        {
            "request_id": "bad-one",
            "errors": [
                {
                    "code": "NotSupportedChoice",
                    "path": "task_type_id",
                    "detail": "The value you selected is not a valid choice.",
                }
            ],
        }
    ]
    assert fake.tasks == {}
    assert api(fake, access, "/api/v4/tasks", "POST", json=[good] * 51).status_code == 400
    assert api(fake, access, "/api/v4/tasks", "POST", json={"text": "x"}).status_code == 400
    r = api(fake, access, "/api/v4/tasks", "POST", json=[{"text": "", "complete_till": "soon"}])
    assert {e["path"] for e in r.json()["validation-errors"][0]["errors"]} == {"text", "complete_till"}
    assert fake.tasks == {}


def test_post_tasks_creates_and_lists(fake):
    access, _ = fake.issue_tokens()
    items = [
        {
            "text": "Позвонить",
            "complete_till": 1_750_100_000,
            "entity_id": 3912171,
            "entity_type": "leads",
            "task_type_id": 2,
            "responsible_user_id": 123123,
            "request_id": "lead-3912171",
        },
        {"text": "Второе", "complete_till": 1_750_200_000},
    ]
    r = api(fake, access, "/api/v4/tasks", "POST", json=items)
    assert r.status_code == 200
    created = r.json()["_embedded"]["tasks"]
    assert set(r.json()) == set(fixture("tasks_create_response.json"))
    assert [t["request_id"] for t in created] == ["lead-3912171", "1"]
    stored = fake.tasks[created[0]["id"]]
    assert (stored["text"], stored["task_type_id"], stored["responsible_user_id"]) == ("Позвонить", 2, 123123)
    assert stored["created_at"] == int(fake._clock()) and stored["request_id"] == "lead-3912171"
    assert fake.tasks[created[1]["id"]]["responsible_user_id"] == 581651  # the token's user

    listed = api(fake, access, "/api/v4/tasks", params={"filter[entity_type]": "leads", "filter[entity_id][]": 3912171})
    assert [t["id"] for t in listed.json()["_embedded"]["tasks"]] == [created[0]["id"]]
    assert "request_id" not in listed.json()["_embedded"]["tasks"][0]
    assert api(fake, access, "/api/v4/tasks", params={"filter[task_type][]": 9}).status_code == 204
    assert api(fake, access, f"/api/v4/tasks/{created[1]['id']}").json()["text"] == "Второе"
    assert api(fake, access, "/api/v4/tasks/1").status_code == 204


def test_drop_after_effect_loses_the_answer_but_creates_the_task(fake):
    access, _ = fake.issue_tokens()
    fake.fail("/api/v4/tasks", drop=True, after_effect=True, method="POST")
    with pytest.raises(requests.ConnectionError):
        api(fake, access, "/api/v4/tasks", "POST", json=[{"text": "x", "complete_till": 1}])
    assert len(fake.tasks) == 1
    assert fake.requests_to("/api/v4/tasks", "POST")[-1].fault == "drop"
    assert api(fake, access, "/api/v4/tasks", "POST", json=[{"text": "y", "complete_till": 1}]).status_code == 200
    assert len(fake.tasks) == 2


def test_token_endpoint_drop_and_delay_spend_the_refresh_token(fake):
    _, refresh = fake.issue_tokens()
    fake.fail("/oauth2/access_token", drop=True)
    with pytest.raises(requests.ConnectionError):
        token_request(fake, grant_type="refresh_token", refresh_token=refresh)
    assert fake.token_state(refresh) == "used"

    _, refresh = fake.issue_tokens()
    fake.fail("/oauth2/access_token", delay=2.0)
    with pytest.raises(requests.Timeout):
        requests.post(
            fake.base_url + "/oauth2/access_token",
            timeout=0.3,
            json={
                "client_id": fake.client_id,
                "client_secret": fake.client_secret,
                "redirect_uri": fake.redirect_uri,
                "grant_type": "refresh_token",
                "refresh_token": refresh,
            },
        )
    assert fake.token_state(refresh) == "used"


def test_status_faults_delay_and_retry_after(fake):
    access, _ = fake.issue_tokens()
    fake.fail("/api/v4/account", status=429, retry_after=3, times=2)
    for _ in range(2):
        r = api(fake, access, "/api/v4/account")
        assert r.status_code == 429 and r.headers["Retry-After"] == "3"
    assert api(fake, access, "/api/v4/account").status_code == 200
    assert fake.count_429 == 2
    fake.fail("/api/v4/leads", status=502, body="<html>bad gateway</html>", content_type="text/html", times=None)
    assert api(fake, access, "/api/v4/leads/pipelines").text == "<html>bad gateway</html>"
    assert api(fake, access, "/api/v4/leads/pipelines").status_code == 502
    fake.clear_faults()
    fake.fail("/api/v4/leads/pipelines", delay=0.3)
    started = time.monotonic()
    assert api(fake, access, "/api/v4/leads/pipelines").status_code == 200
    assert time.monotonic() - started >= 0.3
    fake.fail("/api/v4/account")
    assert api(fake, access, "/api/v4/account").status_code == 500


def test_hang_does_not_hang_the_test_and_stop_is_prompt():
    fake = FakeAmo().start()
    access, _ = fake.issue_tokens()
    fake.fail("/api/v4/account", hang=True, times=None)
    session = requests.Session()  # an idle keep-alive connection must not block stop() either
    assert (
        session.get(
            fake.base_url + "/api/v4/leads/pipelines", timeout=TIMEOUT, headers={"Authorization": f"Bearer {access}"}
        ).status_code
        == 200
    )
    with pytest.raises(requests.Timeout):
        api(fake, access, "/api/v4/account", timeout=0.3)
    outcome = []

    def hanging_call():
        try:
            requests.get(fake.base_url + "/api/v4/account", timeout=10)
        except requests.ConnectionError as exc:  # stop() cuts the connection: no answer at all
            outcome.append(exc)

    background = threading.Thread(target=hanging_call)
    background.start()
    time.sleep(0.1)
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 2
    background.join(timeout=2)
    assert not background.is_alive() and len(outcome) == 1
    with pytest.raises(requests.ConnectionError):
        requests.get(fake.base_url + "/api/v4/account", timeout=1)


# ------------------------------------------------------------------ limits and bans
def test_rate_limit_429_and_max_in_window():
    rate_clock = Clock(100.0)
    with FakeAmo(rate_clock=rate_clock) as fake:
        access, _ = fake.issue_tokens()
        statuses = [api(fake, access, "/api/v4/account").status_code for _ in range(10)]
        assert statuses == [200] * 7 + [429] * 3
        assert fake.count_429 == 3 and fake.max_in_window() == 10
        r = api(fake, access, "/api/v4/account")
        assert r.json()["title"] == "Too Many Requests"
        rate_clock.advance(1.0)
        assert api(fake, access, "/api/v4/account").status_code == 200
        assert fake.max_in_window() == 11 and fake.max_in_window(path_prefix="/oauth2/") == 0


def test_rate_limit_real_time_and_disabled():
    with FakeAmo() as fake:
        access, _ = fake.issue_tokens()
        statuses = [api(fake, access, "/api/v4/account").status_code for _ in range(10)]
        assert 429 in statuses and fake.max_in_window() >= 8
    with FakeAmo(rate_limit=None) as fake:
        access, _ = fake.issue_tokens()
        assert {api(fake, access, "/api/v4/account").status_code for _ in range(10)} == {200}


def test_block_gives_403_html(fake):
    access, refresh = fake.issue_tokens()
    fake.block()
    r = api(fake, access, "/api/v4/account")
    assert r.status_code == 403 and r.headers["Content-Type"] == "text/html" and "403 Forbidden" in r.text
    assert token_request(fake, grant_type="refresh_token", refresh_token=refresh).status_code == 200
    fake.block(False)
    assert api(fake, access, "/api/v4/account").status_code == 200


# ------------------------------------------------------------------ HTTP plumbing
def test_unknown_path_404_wrong_method_405_and_recording(fake):
    access, _ = fake.issue_tokens()
    r = api(fake, access, "/api/v4/nothing")
    assert r.status_code == 404 and r.headers["Content-Type"] == "application/problem+json"
    r = api(fake, access, "/api/v4/account", "DELETE")
    assert r.status_code == 405 and r.headers["Allow"] == "GET"
    rec = fake.requests_to("/api/v4/account")[-1]
    assert (rec.method, rec.status, rec.ip) == ("DELETE", 405, "127.0.0.1")
    assert rec.headers["authorization"] == f"Bearer {access}" and rec.time == fake._clock()


def test_keep_alive_and_concurrency(fake):
    fake.rate_limit = None
    access, _ = fake.issue_tokens()
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {access}"
        for _ in range(3):
            assert session.get(fake.base_url + "/api/v4/account", timeout=TIMEOUT).status_code == 200
    assert len({r.port for r in fake.requests}) == 1
    results = []

    def worker():
        for _ in range(5):
            results.append(
                api(fake, access, "/api/v4/tasks", "POST", json=[{"text": "t", "complete_till": 1}]).status_code
            )

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 80 and len(fake.tasks) == 80


# ------------------------------------------------------------------ events log, leads list, webhooks
CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def events_page(fake, token, **params):
    return api(fake, token, "/api/v4/events", params=params)


def test_events_have_the_documented_shape_and_ulid_like_ids(fake, clock):
    access, _ = fake.issue_tokens(admin=False)
    lead_id = next(iter(fake.leads))
    lead, add_item = fake.create_lead("Новая", 3177727, 32392159, 123123, at=clock.now - 30)
    fake.move_lead(lead_id, 142, at=clock.now - 20)
    fake.change_responsible(lead_id, 123123, at=clock.now - 10)
    body = events_page(fake, access, limit=100).json()
    events = {e["type"]: e for e in body["_embedded"]["events"]}
    documented = fixture("events_list_status_responsible_reconstructed.json")["_embedded"]["events"]
    added_doc = fixture("events_list_lead_added.json")["_embedded"]["events"][0]
    for doc in [*documented, added_doc]:
        ours = events[doc["type"]]
        assert list(ours) == list(doc)  # same keys in the same order
        assert [list(v) for v in ours["value_after"]] == [list(v) for v in doc["value_after"]]
        assert [list(v) for v in ours["value_before"]] == [list(v) for v in doc["value_before"]]
        assert list(ours["_embedded"]["entity"]) == ["id", "_links"]
    for event in events.values():
        eid = event["id"]
        assert isinstance(eid, str) and len(eid) == 26 and set(eid) <= set(CROCKFORD)
        ms = 0
        for ch in eid[:10]:
            ms = ms * 32 + CROCKFORD.index(ch)
        assert ms == event["created_at"] * 1000
        assert event["_links"]["self"]["href"] == f"{fake.base_url}/api/v4/events/{eid}"
        assert api(fake, access, f"/api/v4/events/{eid}").json()["id"] == eid
    status = events["lead_status_changed"]
    assert status["value_before"] == [{"lead_status": {"id": 32392159, "pipeline_id": 3177727}}]
    assert status["value_after"] == [{"lead_status": {"id": 142, "pipeline_id": 3177727}}]
    assert events["entity_responsible_changed"]["value_after"] == [{"responsible_user": {"id": 123123}}]
    assert events["lead_added"]["entity_id"] == lead["id"] == int(add_item["id"])


def test_events_pages_of_100_and_a_larger_limit_gets_50_without_next(fake, clock):
    access, _ = fake.issue_tokens()
    lead_id = next(iter(fake.leads))
    for n in range(230):
        fake.add_event("lead_status_changed", lead_id, at=clock.now - 1000 + n)
    first = events_page(fake, access, limit=100).json()
    assert len(first["_embedded"]["events"]) == 100 and "next" in first["_links"]
    assert "page=2" in first["_links"]["next"]["href"]
    assert len(events_page(fake, access, limit=100, page=3).json()["_embedded"]["events"]) == 30
    assert events_page(fake, access, limit=100, page=4).status_code == 204
    over = events_page(fake, access, limit=250).json()
    assert len(over["_embedded"]["events"]) == 50 and "next" not in over["_links"]
    assert events_page(fake, access, limit=0).status_code == 400
    assert api(fake, "nope", "/api/v4/events").status_code == 401


def test_events_are_not_served_in_time_order_and_new_ones_shift_pages(fake, clock):
    access, _ = fake.issue_tokens()
    lead_id = next(iter(fake.leads))
    for n in range(150):
        fake.add_event("lead_status_changed", lead_id, at=clock.now - 1000 + n)
    served = [e["id"] for e in events_page(fake, access, limit=100).json()["_embedded"]["events"]]
    assert served != sorted(served)
    page2 = [e["id"] for e in events_page(fake, access, limit=100, page=2).json()["_embedded"]["events"]]
    for n in range(20):
        fake.add_event("lead_status_changed", lead_id, at=clock.now + n)
    shifted = [e["id"] for e in events_page(fake, access, limit=100, page=2).json()["_embedded"]["events"]]
    assert shifted != page2  # offset paging over the live list


def test_events_filters_in_both_forms(fake, clock):
    access, _ = fake.issue_tokens()
    a, b = next(iter(fake.leads)), fake.add_lead("B", 3177727, 32392159, 123123)["id"]
    t = int(clock.now) - 100
    for at in (t, t + 10, t + 20):
        fake.add_event("lead_status_changed", a, at=at)
        fake.add_event("entity_responsible_changed", b, at=at)
        fake.add_event("lead_added", a, at=at)
    fake.add_event("task_added", 5, at=t + 10, entity_type="task")

    def got(**params):
        r = events_page(fake, access, limit=100, **params)
        if r.status_code != 200:
            return r.status_code
        return sorted((e["type"], e["created_at"]) for e in r.json()["_embedded"]["events"])

    window = {"filter[created_at][from]": t + 10, "filter[created_at][to]": t + 20}
    both = [
        ("entity_responsible_changed", t + 10),
        ("entity_responsible_changed", t + 20),
        ("lead_status_changed", t + 10),
        ("lead_status_changed", t + 20),
    ]
    assert got(**{"filter[type]": "lead_status_changed,entity_responsible_changed"}, **window) == both
    assert got(**{"filter[type][]": ["lead_status_changed", "entity_responsible_changed"]}, **window) == both
    assert got(**{"filter[type]": "task_added", "filter[entity]": "lead"}) == 204
    assert got(**{"filter[entity]": "task"}) == [("task_added", t + 10)]
    assert got(**{"filter[entity]": "lead", "filter[entity_id][]": [b]}) == [
        ("entity_responsible_changed", at) for at in (t, t + 10, t + 20)
    ]
    assert got(**{"filter[entity_id][]": [b]}) == 400  # needs exactly one entity (documented)
    assert got(**{"filter[created_at][from]": "x"}) == 400


def test_log_delay_offset_and_changes_that_are_never_logged(fake, clock):
    access, _ = fake.issue_tokens()
    lead_id = next(iter(fake.leads))
    item = fake.move_lead(lead_id, 142, log_delay=5, log_offset=-2)
    fake.move_lead(lead_id, 143, log=False)
    assert events_page(fake, access).status_code == 204
    clock.advance(5)
    [event] = events_page(fake, access).json()["_embedded"]["events"]
    assert event["created_at"] == int(item["last_modified"]) - 2 and "visible_at" not in event
    assert fake.leads[lead_id]["status_id"] == 143 and len(fake.events) == 1


def test_lead_changes_return_the_webhook_items_amocrm_would_send(fake, clock):
    from amohook.webhooks.parse import parse_webhook

    lead_id = next(iter(fake.leads))
    moved = fake.move_lead(lead_id, 142, user_id=123123, at=clock.now)
    assert all(isinstance(v, str) for k, v in moved.items() if k != "tags")
    assert moved["id"] == str(lead_id) and moved["old_status_id"] == "32392159" and moved["status_id"] == "142"
    assert moved["last_modified"] == str(int(clock.now)) and moved["modified_user_id"] == "123123"
    lead, added = fake.create_lead("Сделка №1 & co", 3177727, 32392159, 123123)
    resp = fake.change_responsible(lead["id"], 581651)
    assert resp["old_responsible_user_id"] == "123123" and resp["responsible_user_id"] == "581651"

    body = fake.webhook_body("status", [moved])
    assert body.startswith(b"account%5Bsubdomain%5D=example&account%5Bid%5D=1231414&")
    assert b"leads%5Bstatus%5D%5B0%5D%5Bold_status_id%5D=32392159" in body
    parsed = parse_webhook(body, "application/x-www-form-urlencoded")
    assert parsed.account_subdomain == "example" and parsed.account_id == "1231414"
    [ev] = parsed.events
    assert (ev.entity, ev.action, ev.entity_id, ev.data["status_id"]) == ("leads", "status", str(lead_id), "142")
    parsed = parse_webhook(fake.webhook_body("add", [added]), "application/x-www-form-urlencoded")
    assert parsed.events[0].data["name"] == "Сделка №1 & co"


def test_webhook_body_reproduces_a_real_capture_byte_for_byte():
    from urllib.parse import parse_qsl

    capture = Path(__file__).parents[1] / "fixtures" / "webhooks" / "05_lead_add_2025.txt"
    raw = capture.read_text().strip().splitlines()[-1]
    pairs = parse_qsl(raw)
    prefix = "leads[add][0]["
    item = {k[len(prefix) : -1]: v for k, v in pairs if k.startswith(prefix)}
    assert len(item) == 13 and "][" not in "".join(item)
    fake = FakeAmo(subdomain="unirock", account_id=16700680)
    assert fake.webhook_body("add", [item]).decode() == raw


def test_leads_list_by_ids(fake):
    access, _ = fake.issue_tokens(admin=False)
    made = [fake.add_lead(f"L{n}", 3177727, 32392159, 123123)["id"] for n in range(5)]
    r = api(fake, access, "/api/v4/leads", params={"filter[id][]": made[:3] + [1], "limit": 250})
    assert [lead["id"] for lead in r.json()["_embedded"]["leads"]] == made[:3]
    r = api(fake, access, "/api/v4/leads", params={"filter[id]": f"{made[3]},{made[4]}"})
    assert [lead["id"] for lead in r.json()["_embedded"]["leads"]] == made[3:]
    assert api(fake, access, "/api/v4/leads", params={"filter[id][]": [1]}).status_code == 204
    assert api(fake, access, "/api/v4/leads", params={"limit": 251}).status_code == 400


def test_webhooks_admin_only_exact_match_update_limit_and_delete(fake):
    fake.rate_limit = None
    admin, _ = fake.issue_tokens()
    user, _ = fake.issue_tokens(admin=False)
    url = "https://h.example.com/x"
    assert api(fake, admin, "/api/v4/webhooks").status_code == 204
    for method, kwargs in (
        ("GET", {}),
        ("POST", {"json": {"destination": url, "settings": ["add_lead"]}}),
        ("DELETE", {"json": {"destination": url}}),
    ):
        r = api(fake, user, "/api/v4/webhooks", method, **kwargs)
        assert r.status_code == 403 and r.headers["Content-Type"] == "application/problem+json"
    created = api(fake, admin, "/api/v4/webhooks", "POST", json={"destination": url, "settings": ["add_lead"]})
    assert created.status_code == 201
    assert list(created.json()) == list(fixture("webhook_subscribe_response.json"))
    listed = api(fake, admin, "/api/v4/webhooks").json()
    assert list(listed) == list(fixture("webhooks_list.json"))
    assert list(listed["_embedded"]["webhooks"][0]) == list(fixture("webhooks_list.json")["_embedded"]["webhooks"][0])
    assert api(fake, admin, "/api/v4/webhooks", params={"filter[destination]": url + "/"}).status_code == 204
    fake.disable_webhook(url)
    fake.reenable_on_repost = False
    updated = api(fake, admin, "/api/v4/webhooks", "POST", json={"destination": url, "settings": ["status_lead"]})
    assert updated.status_code == 200 and updated.json()["settings"] == ["status_lead"]
    assert updated.json()["disabled"] is True and updated.json()["id"] == created.json()["id"]
    bad = api(fake, admin, "/api/v4/webhooks", "POST", json={"destination": url, "settings": ["no_such"]})
    assert bad.status_code == 400 and "validation-errors" in bad.json()
    for n in range(99):
        fake.add_webhook(f"{url}/{n}", ["add_lead"])
    full = api(fake, admin, "/api/v4/webhooks", "POST", json={"destination": url + "/new", "settings": ["add_lead"]})
    assert full.status_code == 400 and len(fake.webhooks) == 100
    assert api(fake, admin, "/api/v4/webhooks", "DELETE", json={"destination": url}).status_code == 204
    assert api(fake, admin, "/api/v4/webhooks", "DELETE", json={"destination": url}).status_code == 404
