"""The API client against the fake amoCRM over real HTTP, on every store backend: what amoCRM
would have seen (the fake's request log) is the evidence, not the client's own counters."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest

from amohook.amocrm.client import MAX_RETRY_AFTER, AmoClient
from amohook.amocrm.http import USER_AGENT
from amohook.errors import (
    AccountBlocked,
    AmoApiError,
    AmoTemporaryError,
    ExitCode,
    Forbidden,
    RateLimited,
    TokenMissing,
    TokenRevoked,
    Unauthorized,
    ValidationFailed,
)
from amohook.store.models import Account
from tests.conftest import ROOT, cli_env


@pytest.fixture(autouse=True)
def _fake_had_no_bugs(fake):
    yield
    assert not fake.errors, fake.errors


@pytest.fixture
def sleeps():
    """The client's sleeps, recorded instead of slept."""
    return []


@pytest.fixture
def client(store, account, sleeps):
    return AmoClient(store, "example", sleep=sleeps.append, timeout=(2.0, 5.0))


def statuses(fake, path, method=None):
    return [r.status for r in fake.requests_to(path, method)]


# -- identity ----------------------------------------------------------------------------------
def test_requests_carry_the_stored_bearer_token_and_an_amohook_user_agent(client, fake, account):
    client.get("/api/v4/account")
    (rec,) = fake.requests_to("/api/v4/account")
    assert rec.headers["Authorization"] == f"Bearer {account.access_token}"
    assert rec.headers["User-Agent"] == USER_AGENT and USER_AGENT.startswith("amohook/")


def test_a_pair_renewed_by_another_process_is_used_on_the_next_request(client, fake, store):
    client.get("/api/v4/account")
    access, refresh = fake.issue_tokens()
    with store.write():  # what another process's refresh leaves in the store
        Account.update(access_token=access, refresh_token=refresh).where(Account.subdomain == "example").execute()
    client.get("/api/v4/account")
    assert fake.requests_to("/api/v4/account")[-1].headers["Authorization"] == f"Bearer {access}"


def test_an_account_without_tokens_says_run_init_auth(store, fake, account):
    with store.write():
        Account.update(access_token=None).where(Account.subdomain == "example").execute()
    with pytest.raises(TokenMissing, match="init-auth"):
        AmoClient(store, "example").get("/api/v4/account")
    assert fake.requests == []


# -- paging ------------------------------------------------------------------------------------
def test_paging_follows_next_over_several_pages_at_limit_250(client, fake):
    for i in range(598):
        fake.add_user(f"User {i}")
    users = list(client.iter_pages("/api/v4/users", "users"))
    assert len(users) == 600 and len({u["id"] for u in users}) == 600
    pages = fake.requests_to("/api/v4/users")
    assert [r.query.get("page", ["1"])[0] for r in pages] == ["1", "2", "3"]
    assert all(r.query["limit"] == ["250"] for r in pages)


def test_an_empty_list_answered_204_yields_nothing(client, fake):
    assert list(client.iter_pages("/api/v4/tasks", "tasks")) == []
    assert statuses(fake, "/api/v4/tasks") == [204]


def test_a_204_after_a_next_link_ends_the_list(client, fake):
    for i in range(300):
        fake.add_user(f"User {i}")
    pages = client.iter_pages("/api/v4/users", "users")
    first = list(itertools.islice(pages, 250))  # page 1 read; page 2 not asked for yet
    fake.fail("/api/v4/users", status=204, body=b"")
    assert first and list(pages) == []
    assert statuses(fake, "/api/v4/users") == [200, 204]


def test_a_patch_returns_amocrms_answer(client, fake):
    pipeline = fake.add_pipeline("Sales", ["New", "Won"])
    lead = fake.add_lead("Patched", pipeline["id"], pipeline["_embedded"]["statuses"][0]["id"], 581651)
    answer = client.patch("/api/v4/leads", [{"id": lead["id"], "tags_to_add": [{"name": "called"}]}])
    assert [item["id"] for item in answer["_embedded"]["leads"]] == [lead["id"]]


def test_a_single_entity_answered_204_is_none(client, fake):
    assert client.get("/api/v4/leads/999999") is None
    assert statuses(fake, "/api/v4/leads/999999") == [204]


def test_a_next_link_that_loops_is_stopped(client, fake):
    looping = {
        "_page": 1,
        "_links": {"next": {"href": f"{fake.base_url}/api/v4/users?limit=250&page=1"}},
        "_embedded": {"users": [{"id": 1, "name": "A"}]},
    }
    fake.fail("/api/v4/users", status=200, body=looping, times=None, content_type="application/hal+json")
    with pytest.raises(AmoApiError, match="already read"):
        list(client.iter_pages("/api/v4/users", "users"))
    assert len(fake.requests_to("/api/v4/users")) <= 2


# -- 401 ---------------------------------------------------------------------------------------
def test_401_refreshes_once_and_repeats_the_request(client, fake, store):
    fake.expire_access_tokens()
    assert client.get("/api/v4/account")["id"] == fake.account_id
    assert fake.refresh_calls == 1
    assert statuses(fake, "/api/v4/account") == [401, 200]
    new = Account.get(Account.subdomain == "example").access_token
    assert fake.token_state(new) == "valid"


def test_401_again_after_the_refresh_is_unauthorized_and_not_looped(client, fake):
    fake.fail("/api/v4/account", status=401, times=2)
    with pytest.raises(Unauthorized, match="init-auth") as err:
        client.get("/api/v4/account")
    assert err.value.exit_code == ExitCode.REAUTH
    assert fake.refresh_calls == 1 and statuses(fake, "/api/v4/account") == [401, 401]


def test_401_with_a_revoked_grant_asks_for_a_new_authorization(client, fake):
    fake.revoke_all()
    with pytest.raises(TokenRevoked) as err:
        client.get("/api/v4/account")
    assert err.value.exit_code == ExitCode.REAUTH and "init-auth" in err.value.message
    assert statuses(fake, "/api/v4/account") == [401]


HIT_401 = """
import sys, time
from amohook.store import open_store
from amohook.amocrm.client import AmoClient
store = open_store(sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
print(AmoClient(store, "example").get("/api/v4/account")["id"])
"""


@pytest.mark.slow
def test_two_processes_hitting_401_at_once_refresh_only_once(store, fake, account):
    fake.expire_access_tokens()
    start = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HIT_401, store.url, str(start)],
            env=cli_env(store.url),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert fake.refresh_calls == 1
    assert statuses(fake, "/api/v4/account").count(200) == 2


# -- 429 ---------------------------------------------------------------------------------------
def test_429_waits_as_long_as_retry_after_says_then_retries(client, fake, sleeps):
    fake.fail("/api/v4/account", status=429, retry_after=2)
    assert client.get("/api/v4/account")["id"] == fake.account_id
    assert sleeps == [2.0] and statuses(fake, "/api/v4/account") == [429, 200]
    assert client.rate_limited == 1


def test_a_huge_retry_after_is_capped(client, fake, sleeps):
    fake.fail("/api/v4/account", status=429, retry_after=86400)
    client.get("/api/v4/account")
    assert sleeps == [MAX_RETRY_AFTER]


def test_429_without_retry_after_backs_off_at_least_a_second_doubling(client, fake, sleeps):
    fake.fail("/api/v4/account", status=429, times=2)
    client.get("/api/v4/account")
    assert len(sleeps) == 2 and 1.0 <= sleeps[0] <= 2.0 and 2.0 <= sleeps[1] <= 4.0


def test_429_on_a_write_is_retried_because_amocrm_did_not_process_it(client, fake, sleeps):
    fake.fail("/api/v4/tasks", status=429, method="POST", retry_after=1)
    answer = client.post("/api/v4/tasks", [{"text": "Call back", "complete_till": 1_900_000_000}])
    assert len(answer["_embedded"]["tasks"]) == 1
    assert statuses(fake, "/api/v4/tasks", "POST") == [429, 200] and len(fake.tasks) == 1


def test_429_that_never_ends_raises_rate_limited_after_max_attempts(store, account, fake, sleeps):
    fake.fail("/api/v4/account", status=429, times=None, retry_after=1)
    client = AmoClient(store, "example", sleep=sleeps.append, max_attempts=3)
    with pytest.raises(RateLimited) as err:
        client.get("/api/v4/account")
    assert err.value.exit_code == ExitCode.TEMPORARY and err.value.retry_after == 1.0
    assert len(fake.requests_to("/api/v4/account")) == 3


@pytest.mark.slow
@pytest.mark.alone
@pytest.mark.amocrm_rate
def test_real_429s_from_too_fast_a_caller_are_absorbed(store, account, fake):
    client = AmoClient(store, "example")  # no limiter, real sleeps: the fake enforces 7/s
    for _ in range(10):
        client.get("/api/v4/account")
    assert fake.count_429 >= 1 and client.rate_limited == fake.count_429
    assert statuses(fake, "/api/v4/account").count(200) == 10


# -- 5xx, timeouts, dropped connections ----------------------------------------------------------
def test_a_read_answered_5xx_is_retried_with_backoff(client, fake, sleeps):
    fake.fail("/api/v4/account", status=502, times=2)
    assert client.get("/api/v4/account")["id"] == fake.account_id
    assert statuses(fake, "/api/v4/account") == [502, 502, 200] and len(sleeps) == 2


def test_a_read_that_keeps_failing_is_a_temporary_error_with_amocrms_words(store, account, fake, sleeps):
    fake.fail("/api/v4/account", status=503, times=None)
    client = AmoClient(store, "example", sleep=sleeps.append, max_attempts=3)
    with pytest.raises(AmoTemporaryError) as err:
        client.get("/api/v4/account")
    assert err.value.exit_code == ExitCode.TEMPORARY
    assert (err.value.status, err.value.title) == (503, "Service Unavailable")
    assert len(fake.requests_to("/api/v4/account")) == 3


def test_a_read_timeout_is_retried(store, account, fake, sleeps):
    fake.fail("/api/v4/account", delay=1.5)
    client = AmoClient(store, "example", sleep=sleeps.append, timeout=(2.0, 0.3))
    assert client.get("/api/v4/account")["id"] == fake.account_id
    assert len(fake.requests_to("/api/v4/account")) == 2


def test_a_read_on_a_dropped_connection_is_retried(client, fake):
    fake.fail("/api/v4/account", drop=True)
    assert client.get("/api/v4/account")["id"] == fake.account_id
    assert len(fake.requests_to("/api/v4/account")) == 2


TASK = [{"text": "Call back", "complete_till": 1_900_000_000}]


def test_a_write_answered_500_is_not_resent(client, fake, sleeps):
    fake.fail("/api/v4/tasks", status=500, method="POST")
    with pytest.raises(AmoTemporaryError) as err:
        client.post("/api/v4/tasks", TASK)
    assert err.value.status == 500
    assert len(fake.requests_to("/api/v4/tasks", "POST")) == 1 and sleeps == []


def test_a_write_whose_connection_drops_is_not_resent_and_the_error_says_why(client, fake, sleeps):
    fake.fail("/api/v4/tasks", drop=True, after_effect=True, method="POST")  # done, answer lost
    with pytest.raises(AmoTemporaryError, match="never re-sent"):
        client.post("/api/v4/tasks", TASK)
    assert len(fake.requests_to("/api/v4/tasks", "POST")) == 1 and len(fake.tasks) == 1


@pytest.mark.slow
def test_a_write_that_times_out_is_not_resent(store, account, fake, sleeps):
    fake.fail("/api/v4/tasks", delay=1.5, method="POST")
    client = AmoClient(store, "example", sleep=sleeps.append, timeout=(2.0, 0.3))
    with pytest.raises(AmoTemporaryError, match="never re-sent"):
        client.post("/api/v4/tasks", TASK)
    time.sleep(1.3)  # let the fake finish the delayed request before counting
    assert len(fake.requests_to("/api/v4/tasks", "POST")) == 1


# -- 403 and typed errors ----------------------------------------------------------------------
def test_a_blocked_account_stops_at_once_without_retry(client, fake, sleeps):
    fake.block()
    with pytest.raises(AccountBlocked) as err:
        client.get("/api/v4/account")
    assert err.value.exit_code == ExitCode.BLOCKED and err.value.status == 403
    assert "blocked" in err.value.message and "support" in err.value.message
    assert len(fake.requests) == 1 and sleeps == []


def test_a_403_with_problem_json_is_forbidden_not_blocked(client, fake, store):
    access, refresh = fake.issue_tokens(admin=False)
    with store.write():
        Account.update(access_token=access, refresh_token=refresh).where(Account.subdomain == "example").execute()
    with pytest.raises(Forbidden) as err:
        client.get("/api/v4/users")
    assert err.value.status == 403 and "администратора" in err.value.detail
    assert len(fake.requests) == 1


def test_validation_errors_are_typed_and_carry_amocrms_fields(client, fake):
    with pytest.raises(ValidationFailed) as err:
        client.post("/api/v4/tasks", [{"text": "", "complete_till": "tomorrow"}])
    e = err.value
    assert (e.status, e.title, e.detail) == (400, "Bad Request", "Request validation failed")
    codes = {x["path"]: x["code"] for x in e.validation_errors[0]["errors"]}
    assert codes == {"text": "NotBlank", "complete_till": "InvalidType"}
    assert fake.tasks == {}


def test_an_unknown_path_is_a_plain_api_error_with_the_status(client, fake):
    with pytest.raises(AmoApiError) as err:
        client.get("/api/v4/nothing")
    assert type(err.value) is AmoApiError and err.value.status == 404
    assert len(fake.requests) == 1


def test_a_success_answer_that_is_not_json_is_a_typed_error(client, fake):
    fake.fail("/api/v4/account", status=200, body="<html>maintenance</html>", content_type="text/html")
    with pytest.raises(AmoApiError, match="not JSON"):
        client.get("/api/v4/account")


def test_a_long_lived_token_answered_401_is_not_refreshed_and_says_generate_a_new_one(client, fake, store):
    with store.write():
        Account.update(access_token=fake.issue_long_lived_token(), refresh_token=None, long_lived=True).where(
            Account.subdomain == "example"
        ).execute()
    fake.revoke_all()
    with pytest.raises(Unauthorized, match="long-lived") as err:
        client.get("/api/v4/account")
    assert err.value.exit_code == ExitCode.REAUTH
    assert fake.refresh_calls == 0 and statuses(fake, "/api/v4/account") == [401]
