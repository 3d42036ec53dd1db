"""The one backoff formula (amohook.retry) and the one "wait for a person" decision (errors.needs_person)."""

import pytest

from amohook.errors import (
    AccountBlocked,
    AmoTemporaryError,
    RateLimited,
    TokenMissing,
    TokenRevoked,
    Unauthorized,
    describe,
    needs_person,
)
from amohook.retry import ACTIONS, CLIENT_READ, RATE_LIMITED, Backoff


def test_backoff_doubles_from_the_base_up_to_the_cap():
    policy = Backoff(base=2.0, cap=10.0, jitter=0.0)
    assert [policy.delay(n) for n in range(1, 6)] == [2, 4, 8, 10, 10]


def test_jitter_only_shortens_the_delay_by_at_most_its_fraction():
    policy = Backoff(base=30.0, cap=3600.0, jitter=0.5)
    assert policy.delay(2, 0.0) == 60 and policy.delay(2, 0.5) == 45
    assert 30 <= policy.delay(2) <= 60


@pytest.mark.parametrize("attempt", [1, 3, 12])
def test_the_callers_policies_stay_within_their_bounds(attempt):
    assert 0 <= CLIENT_READ.delay(attempt) <= 30.0
    assert ACTIONS.delay(attempt) >= min(3600.0, 30.0 * 2 ** (attempt - 1)) / 2


def test_a_revoked_grant_and_a_blocked_account_wait_for_a_person_nothing_else_does():
    assert needs_person(TokenRevoked("example")) and needs_person(TokenMissing("example"))
    assert needs_person(Unauthorized("401")) and needs_person(AccountBlocked("blocked"))
    assert not needs_person(RateLimited("429", retry_after=5)) and not needs_person(AmoTemporaryError("502"))
    assert not needs_person(RuntimeError("x"))


def test_describe_is_one_short_line():
    assert describe(RuntimeError("first line\nsecond " + "x" * 500)) == "RuntimeError: first line"
    assert describe(ValueError()) == "ValueError"
    assert len(describe(RuntimeError("y" * 1000))) <= len("RuntimeError: ") + 200


# -- a 429 without Retry-After: one answer, whoever gets it ----------------------------------------
def test_a_429_without_retry_after_waits_one_to_two_seconds_then_doubles():
    assert [RATE_LIMITED.delay(n, 0.0) for n in (1, 2, 3, 10)] == [2.0, 4.0, 8.0, 60.0]
    assert RATE_LIMITED.delay(1, 0.999) >= 1.0  # never less than the limit's one-second window


def test_the_worker_answers_a_bare_429_as_the_client_does():
    from amohook.retry import EVENTS, decide

    for attempt in (1, 2, 3):
        for rand in (0.0, 0.5):
            assert decide(RateLimited("429"), attempt, EVENTS, rand).wait == RATE_LIMITED.delay(attempt, rand)


def test_the_client_waits_the_same_between_429s_without_retry_after(store, fake, account):
    from amohook.amocrm.client import AmoClient

    fake.fail("/api/v4/account", status=429, times=3)
    waits: list[float] = []
    AmoClient(store, "example", sleep=waits.append).request("GET", "/api/v4/account")
    assert len(waits) == 3
    for attempt, wait in enumerate(waits, start=1):
        assert RATE_LIMITED.delay(attempt, 0.999999) <= wait <= RATE_LIMITED.delay(attempt, 0.0)


def test_the_sender_waits_the_same_after_a_429_without_retry_after(store, fake, account):
    from amohook.actions import ActionSender, record_planned
    from amohook.actions.base import PlannedAction
    from amohook.amocrm.client import client_for
    from amohook.store.models import Action

    now = 1_700_000_000.0
    key = "a" * 64
    task = {
        "text": "Call lead 1",
        "complete_till": 1_900_000_000,
        "entity_id": 1,
        "entity_type": "leads",
        "task_type_id": 1,
        "responsible_user_id": 581651,
        "request_id": key[:32],
    }
    action = PlannedAction(key=key, rule="r", account="example", lead_id=1, payload=task, kind="create_task")
    record_planned(store, [action], 1)
    fake.fail("/api/v4/tasks", status=429, method="POST")
    sender = ActionSender(store, lambda sub: client_for(store, sub, max_attempts=1), clock=lambda: now)
    sender.flush_once()
    action = Action.get()
    assert action.status == "pending" and action.attempts == 0  # a 429 is not an attempt
    assert RATE_LIMITED.delay(1, 0.999999) <= action.lease_until - now <= RATE_LIMITED.delay(1, 0.0)


def test_one_decision_for_events_and_actions_differs_only_where_their_policies_say():
    from amohook.errors import PermanentError, RefusedBeforeRefresh
    from amohook.retry import ACTIONS_POLICY, EVENTS, Decision, decide

    # an ordinary failure: each policy's backoff, counted, until max_attempts
    assert decide(RuntimeError("x"), 1, EVENTS, 0.0) == Decision(5.0, True)
    assert decide(RuntimeError("x"), 1, ACTIONS_POLICY, 0.0) == Decision(30.0, True)
    assert decide(RuntimeError("x"), 10, EVENTS, 0.0) == decide(RuntimeError("x"), 10, ACTIONS_POLICY, 0.0)
    assert decide(RuntimeError("x"), 10, EVENTS, 0.0) == Decision(None, True)
    # a 429: an attempt for an event, not for an action (nothing was wrong with it)
    assert decide(RateLimited("429", retry_after=7.0), 1, EVENTS, 0.5) == Decision(7.5, True)
    assert decide(RateLimited("429", retry_after=7.0), 10, ACTIONS_POLICY, 0.5) == Decision(7.0, False)
    # waiting for a person
    assert decide(TokenRevoked("example"), 1, ACTIONS_POLICY, 0.0) == Decision(900.0, False)
    assert decide(TokenRevoked("example"), 1, EVENTS, 0.0) == Decision(900.0, True)
    # refused before a refresh: again at once, an attempt; a permanent error: give up
    assert decide(RefusedBeforeRefresh("401"), 1, ACTIONS_POLICY, 0.3) == Decision(0.0, True)
    assert decide(PermanentError("bad"), 1, EVENTS, 0.0) == Decision(None, True)
