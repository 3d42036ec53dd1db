"""Reading the events log, leads by id and the webhook subscriptions against the fake amoCRM over
real HTTP. What amoCRM would have seen (the fake's request log) is the evidence."""

from __future__ import annotations

import pytest
import requests

from amohook.amocrm.client import AmoClient, client_for
from amohook.amocrm.events import EVENT_PAGE_LIMIT, fetch_events
from amohook.amocrm.leads import fetch_leads
from amohook.amocrm.subscriptions import AdminRequired, Webhook, list_webhooks, subscribe, unsubscribe
from amohook.errors import AccountBlocked, AmoApiError, AmoTemporaryError, ExitCode
from amohook.store.models import Account

T0 = 1_760_000_000
TYPES = ("lead_added", "lead_status_changed", "entity_responsible_changed")
CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
HOOK = "https://hooks.example.com/amo/Ab9?secret=x%2Fy"


@pytest.fixture(autouse=True)
def _fake_had_no_bugs(fake):
    yield
    assert not fake.errors, fake.errors


@pytest.fixture
def sleeps():
    return []


@pytest.fixture
def client(store, account, fake, sleeps):
    fake.rate_limit = None  # these tests are about content; the 429 tests switch it back on
    return AmoClient(store, "example", sleep=sleeps.append, timeout=(2.0, 5.0))


def status_events(fake, n: int, start: int = T0, step: int = 1) -> list[dict]:
    """``n`` lead_status_changed events at start, start+step, … (random positions in the log)."""
    lead = next(iter(fake.leads))
    return [
        fake.add_event(
            "lead_status_changed",
            lead,
            at=start + i * step,
            value_before=[{"lead_status": {"id": 1, "pipeline_id": 2}}],
            value_after=[{"lead_status": {"id": 3, "pipeline_id": 2}}],
        )
        for i in range(n)
    ]


def decode_ms(event_id: str) -> int:
    value = 0
    for ch in event_id[:10]:
        value = value * 32 + CROCKFORD.index(ch)
    return value


def ordered(events: list[dict]) -> list[dict]:
    return sorted(events, key=lambda e: (e["created_at"], e["id"]))


def ids(events: list[dict]) -> list[str]:
    return [e["id"] for e in events]


def use_non_admin_token(store, fake) -> None:
    access, refresh = fake.issue_tokens(admin=False, user_id=123123)
    Account.update(access_token=access).where(Account.subdomain == "example").execute()


# -- events: paging, window, order ------------------------------------------------------------------
def test_a_window_over_several_pages_is_read_completely_with_one_fixed_upper_bound(client, fake):
    wanted = status_events(fake, 350)
    events = fetch_events(client, types=TYPES, created_from=T0, created_to=T0 + 349, entity="lead")

    assert ids(events) == ids(ordered(wanted))
    pages = fake.requests_to("/api/v4/events")
    assert len(pages) == 4  # 100 + 100 + 100 + 50
    for n, rec in enumerate(pages, 1):
        assert rec.query["filter[type]"] == [",".join(TYPES)]  # comma-joined, as the official SDK sends
        assert rec.query["filter[created_at][from]"] == [str(T0)]
        assert rec.query["filter[created_at][to]"] == [str(T0 + 349)]
        assert rec.query["filter[entity]"] == ["lead"]
        assert rec.query["limit"] == [str(EVENT_PAGE_LIMIT)] and rec.query["page"] == [str(n)]


def test_events_written_while_paging_shift_the_pages_but_nothing_in_the_window_is_missed(store, account, fake):
    fake.rate_limit = None
    wanted = status_events(fake, 420)
    lead = next(iter(fake.leads))
    added = []

    def write_more(response, *args, **kwargs):
        # After each page: 30 new events inside the window and 30 after it, at random log positions
        # (the fake's offset paging over the live list shifts the next pages).
        if "/api/v4/events" in response.url:
            added.extend(fake.add_event("lead_added", lead, at=T0 + 10 + i) for i in range(30))
            fake.move_lead(lead, 142)
            for _ in range(29):
                fake.add_event("lead_status_changed", lead, at=T0 + 10_000)

    session = requests.Session()
    session.hooks["response"].append(write_more)
    client = AmoClient(store, "example", session=session)
    events = fetch_events(client, types=TYPES, created_from=T0, created_to=T0 + 500)

    got = ids(events)
    assert set(ids(wanted)) <= set(got), "an event of the window was missed"
    assert len(got) == len(set(got)), "an event was returned twice"
    assert got == ids(ordered(events)) and all(T0 <= e["created_at"] <= T0 + 500 for e in events)
    assert len(added) >= 150 and len(fake.requests_to("/api/v4/events")) >= 5


def test_the_served_order_is_ignored_and_the_window_comes_back_sorted_with_string_ids(client, fake):
    wanted = status_events(fake, 60, step=0) + status_events(fake, 60, start=T0 + 1, step=-1)
    served = [e for e in fake.events]
    assert ids(served) != ids(ordered(served)), "the fake must not serve the log in (created_at, id) order"

    events = fetch_events(client, types=["lead_status_changed"], created_from=T0 - 100, created_to=T0 + 100)

    assert ids(events) == ids(ordered(wanted))
    for event in events:
        assert isinstance(event["id"], str) and len(event["id"]) == 26
        assert decode_ms(event["id"]) == event["created_at"] * 1000


def test_events_outside_the_window_and_repeated_ids_are_dropped_whatever_amocrm_serves(client, fake):
    low, middle, high = status_events(fake, 3, start=T0 + 5)
    outside = [dict(middle, id="01" + "x" * 24, created_at=T0 + 4), dict(middle, id="01" + "y" * 24, created_at=T0 + 8)]
    page = {"_page": 1, "_links": {}, "_embedded": {"events": [middle, *outside, middle, high, low]}}
    fake.fail("/api/v4/events", status=200, body=page, content_type="application/hal+json")

    events = fetch_events(client, types=["lead_status_changed"], created_from=T0 + 5, created_to=T0 + 7)

    assert ids(events) == ids(ordered([low, middle, high]))


def test_only_the_asked_types_and_the_closed_window_are_returned(client, fake):
    lead = next(iter(fake.leads))
    for at in (T0 - 1, T0, T0 + 10, T0 + 11):
        for kind in (*TYPES, "lead_deleted"):
            fake.add_event(kind, lead, at=at)

    events = fetch_events(client, types=["lead_status_changed", "lead_added"], created_from=T0, created_to=T0 + 10)

    assert sorted((e["created_at"], e["type"]) for e in events) == [
        (T0, "lead_added"),
        (T0, "lead_status_changed"),
        (T0 + 10, "lead_added"),
        (T0 + 10, "lead_status_changed"),
    ]


def test_an_empty_window_is_one_request_answered_204(client, fake):
    status_events(fake, 5)
    assert fetch_events(client, types=TYPES, created_from=T0 + 100, created_to=T0 + 200) == []
    assert [r.status for r in fake.requests_to("/api/v4/events")] == [204]


def test_more_pages_than_allowed_is_an_error_not_a_truncated_window(client, fake):
    status_events(fake, 250)
    with pytest.raises(AmoApiError) as err:
        fetch_events(client, types=TYPES, created_from=T0, created_to=T0 + 300, max_pages=2)
    assert "more than 2 pages" in str(err.value) and "\n" not in str(err.value)
    assert len(fake.requests_to("/api/v4/events")) == 2
    assert len(fetch_events(client, types=TYPES, created_from=T0, created_to=T0 + 300, max_pages=3)) == 250


def test_bad_arguments_are_refused_before_any_request(client, fake):
    with pytest.raises(ValueError):
        fetch_events(client, types=[], created_from=T0, created_to=T0)
    with pytest.raises(ValueError):
        fetch_events(client, types=TYPES, created_from=T0 + 1, created_to=T0)
    assert fake.requests_to("/api/v4/events") == []


def test_a_429_mid_window_is_waited_out_and_the_window_completed(client, fake, sleeps):
    wanted = status_events(fake, 250)
    fake.fail("/api/v4/events", status=429, retry_after=2, times=2)
    events = fetch_events(client, types=TYPES, created_from=T0, created_to=T0 + 300)
    assert ids(events) == ids(ordered(wanted))
    assert [r.status for r in fake.requests_to("/api/v4/events")] == [429, 429, 200, 200, 200]
    assert sleeps == [2.0, 2.0]


@pytest.mark.slow
@pytest.mark.alone
@pytest.mark.amocrm_rate
def test_paging_through_the_shared_limiter_makes_no_429_against_7_per_second(store, account, fake):
    wanted = status_events(fake, 1000)
    fake.rate_limit = 7
    client = client_for(store, "example")
    events = fetch_events(client, types=TYPES, created_from=T0, created_to=T0 + 1000)
    assert len(events) == len(wanted) and fake.count_429 == 0
    assert len(fake.requests_to("/api/v4/events")) == 10 and fake.max_in_window() <= 7


def test_a_change_logged_late_appears_once_its_delay_has_passed(client, fake, store):
    lead = next(iter(fake.leads))
    item = fake.move_lead(lead, 142, at=T0, log_delay=3600)
    lost = fake.move_lead(lead, 143, at=T0 + 1, log=False)
    assert fetch_events(client, types=TYPES, created_from=T0 - 5, created_to=T0 + 5) == []
    for event in fake.events:
        event["visible_at"] -= 3600
    [event] = fetch_events(client, types=TYPES, created_from=T0 - 5, created_to=T0 + 5)
    assert event["entity_id"] == lead and event["value_after"][0]["lead_status"]["id"] == 142
    assert item["status_id"] == "142" and lost["old_status_id"] == "142"


# -- leads by id --------------------------------------------------------------------------------------
def test_600_leads_are_read_in_3_requests_and_missing_ones_are_absent(client, fake):
    made = [fake.add_lead(f"Lead {n}", 3177727, 32392159, 581651)["id"] for n in range(600)]
    asked = made + made[:10] + [999_000_001, 999_000_002]  # repeats and two deleted leads

    leads = fetch_leads(client, asked)

    assert sorted(leads) == sorted(made) and all(leads[i]["id"] == i for i in made)
    reqs = fake.requests_to("/api/v4/leads")
    assert len(reqs) == 3
    sizes = [len(r.query["filter[id][]"]) for r in reqs]
    assert sizes == [250, 250, 102] and all(r.query["limit"] == ["250"] for r in reqs)
    assert all("with" not in r.query for r in reqs)


def test_no_ids_is_no_request(client, fake):
    assert fetch_leads(client, []) == {} and fake.requests_to("/api/v4/leads") == []


# -- webhook subscriptions ------------------------------------------------------------------------------
def test_subscribe_list_update_and_unsubscribe_with_exact_destinations(client, fake):
    fake.add_webhook("https://other.example.com/hook", ["add_task"])
    hook = subscribe(client, HOOK, ["status_lead", "add_lead"])
    assert isinstance(hook, Webhook) and hook.destination == HOOK and hook.disabled is False
    assert hook.events == ("status_lead", "add_lead") and isinstance(hook.id, int)
    assert fake.requests_to("/api/v4/webhooks", "POST")[0].json == {
        "destination": HOOK,
        "settings": ["status_lead", "add_lead"],
    }

    assert [h.destination for h in list_webhooks(client)] == ["https://other.example.com/hook", HOOK]
    assert list_webhooks(client, HOOK) == [hook]
    assert list_webhooks(client, HOOK + "/") == [] and list_webhooks(client, HOOK.lower()) == []
    assert fake.requests_to("/api/v4/webhooks", "GET")[1].query["filter[destination]"] == [HOOK]

    again = subscribe(client, HOOK, ["status_lead", "responsible_lead"])  # updates, never duplicates
    assert again.id == hook.id and again.events == ("status_lead", "responsible_lead")
    assert len(fake.webhooks) == 2

    assert unsubscribe(client, HOOK) is True
    assert fake.requests_to("/api/v4/webhooks", "DELETE")[0].json == {"destination": HOOK}
    assert unsubscribe(client, HOOK) is False
    assert [h.destination for h in list_webhooks(client)] == ["https://other.example.com/hook"]


def test_an_empty_subscription_list_answered_204_is_empty(client, fake):
    assert list_webhooks(client) == [] and list_webhooks(client, HOOK) == []


def test_a_switched_off_subscription_is_visible(client, fake):
    subscribe(client, HOOK, ["status_lead"])
    fake.disable_webhook(HOOK)
    [hook] = list_webhooks(client, HOOK)
    assert hook.disabled is True


def test_re_posting_a_switched_off_destination_when_amocrm_re_enables_it(client, fake):
    fake.reenable_on_repost = True
    first = subscribe(client, HOOK, ["status_lead"])
    fake.disable_webhook(HOOK)
    again = subscribe(client, HOOK, ["status_lead"])
    assert again.disabled is False and again.id == first.id
    assert list_webhooks(client, HOOK)[0].disabled is False


def test_re_posting_a_switched_off_destination_when_amocrm_keeps_it_off(client, fake):
    fake.reenable_on_repost = False
    first = subscribe(client, HOOK, ["status_lead"])
    fake.disable_webhook(HOOK)
    assert subscribe(client, HOOK, ["status_lead"]).disabled is True
    assert list_webhooks(client, HOOK)[0].disabled is True
    # Only remove-and-add yields an enabled hook (a new one).
    assert unsubscribe(client, HOOK) is True
    fresh = subscribe(client, HOOK, ["status_lead"])
    assert fresh.disabled is False and fresh.id != first.id
    assert list_webhooks(client, HOOK) == [fresh]


def test_a_non_admin_token_gets_one_line_admin_required_from_every_call(client, fake, store):
    fake.add_webhook(HOOK, ["status_lead"])
    use_non_admin_token(store, fake)
    for call in (
        lambda: list_webhooks(client),
        lambda: subscribe(client, HOOK, ["add_lead"]),
        lambda: unsubscribe(client, HOOK),
    ):
        with pytest.raises(AdminRequired) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and err.value.status == 403
        assert "the token's user is not an administrator of 'example'" in message
        assert "only an admin may list or change webhook subscriptions" in message
        assert "amohook init-auth" in message and err.value.exit_code == ExitCode.USAGE
    assert len(fake.webhooks) == 1
    # The events log is open to every user (crm_platform/events-and-notes).
    assert fetch_events(client, types=TYPES, created_from=T0, created_to=T0 + 1) == []


def test_a_ban_stays_a_ban_not_an_admin_problem(client, fake):
    fake.block()
    with pytest.raises(AccountBlocked):
        list_webhooks(client)


def test_a_subscribe_answered_500_is_not_resent_but_a_429_is(client, fake, sleeps):
    fake.fail("/api/v4/webhooks", status=500, method="POST")
    with pytest.raises(AmoTemporaryError):
        subscribe(client, HOOK, ["status_lead"])
    assert len(fake.requests_to("/api/v4/webhooks", "POST")) == 1

    fake.fail("/api/v4/webhooks", status=429, retry_after=1, method="POST")
    assert subscribe(client, HOOK, ["status_lead"]).destination == HOOK
    assert [r.status for r in fake.requests_to("/api/v4/webhooks", "POST")] == [500, 429, 201]


def test_an_unsubscribe_answered_500_is_not_resent(client, fake):
    fake.add_webhook(HOOK, ["status_lead"])
    fake.fail("/api/v4/webhooks", status=502, method="DELETE")
    with pytest.raises(AmoTemporaryError):
        unsubscribe(client, HOOK)
    assert len(fake.requests_to("/api/v4/webhooks", "DELETE")) == 1 and len(fake.webhooks) == 1


def test_a_batch_refused_as_too_long_a_url_is_split_in_halves(client, fake):
    made = [fake.add_lead(f"Lead {n}", 3177727, 32392159, 581651)["id"] for n in range(300)]
    fake.max_target = 4000  # a stricter proxy than nginx's default 8 KB request line
    leads = fetch_leads(client, made)
    assert sorted(leads) == sorted(made)
    assert [r.status for r in fake.requests_to("/api/v4/leads")] == [414, 200, 200, 200]
    assert [len(r.query["filter[id][]"]) for r in fake.requests_to("/api/v4/leads")] == [250, 125, 125, 50]


def test_250_lead_ids_fit_nginx_default_request_line(client, fake):
    fake.max_target = 8 * 1024
    fetch_leads(client, range(900_000_000, 900_000_250))
    [rec] = fake.requests_to("/api/v4/leads")
    assert rec.status == 204 and 7_000 < len(rec.target) < 8 * 1024
