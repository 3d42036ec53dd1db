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
from amohook.retry import ACTIONS, CLIENT_READ, Backoff


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
