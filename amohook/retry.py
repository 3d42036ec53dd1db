"""The one retry decision (``decide``), the one backoff formula, and how long to wait for a person.

``decide(error, attempt, policy, rand)`` answers, for the worker's events and the sender's
actions alike: how long to wait, whether the attempt counts, or to give up. The policies differ
only in their numbers and two choices written on them (``EVENTS``, ``ACTIONS_POLICY``).

Each caller keeps its own numbers (a read retried within a request waits half a second; an event
that failed waits minutes; an action amoCRM refused waits longer) but they all grow the same way:
exponentially from ``base`` by ``factor``, capped at ``cap``, then jittered down by up to
``jitter`` of the delay so that many workers that failed together do not come back together.
Pure: ``rand`` is passed in, so the delays are tested without clocks or randomness.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from amohook.errors import PermanentError, RateLimited, RefusedBeforeRefresh, needs_person
from amohook.settings import MAX_ATTEMPTS

# A revoked grant or a blocked account (see errors.needs_person): only a person can fix it, so
# retrying is slow and does not count as an attempt where the caller counts attempts.
PERSON_WAIT = 900.0


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: ``delay(n)`` is the wait after failed attempt ``n`` (1-based)."""

    base: float
    cap: float
    factor: float = 2.0
    jitter: float = 1.0  # the delay is drawn from [d * (1 - jitter), d]; 1.0 is "full jitter"

    def delay(self, attempt: int, rand: float | None = None) -> float:
        """Seconds to wait after attempt ``attempt`` failed; ``rand`` in [0, 1) picks the jitter."""
        full = min(self.cap, self.base * self.factor ** max(0, attempt - 1))
        r = random.random() if rand is None else rand
        return full * (1.0 - self.jitter * r)


# A read to amoCRM repeated inside one request (a dropped connection, a 5xx).
CLIENT_READ = Backoff(base=0.5, cap=30.0)
# A batch of actions amoCRM did not take: 30 s doubling, capped at 1 h, jittered by half.
ACTIONS = Backoff(base=30.0, cap=3600.0, jitter=0.5)
# amoCRM answered 429 (too many requests, docs/amocrm.md §4) without saying how long to wait: the
# limit is per second, so at least a second, doubling with each 429 in a row up to a minute, so
# that a client does not earn the ban that repeated violations bring. One answer for every caller:
# the client inside a request, the worker's handlers and the action sender.
RATE_LIMITED = Backoff(base=2.0, cap=60.0, jitter=0.5)


def parse_retry_after(value: str | None, *, floor: float = 0.0, cap: float) -> float | None:
    """A ``Retry-After`` header's seconds, within [floor, cap]; None when absent or not a number
    (an HTTP date is not used by amoCRM and is read as absent: the caller's own wait applies)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if seconds != seconds:  # NaN
        return None
    return min(cap, max(floor, seconds))


@dataclass(frozen=True)
class RetryPolicy:
    """How one kind of work is retried; see ``decide``."""

    max_attempts: int = MAX_ATTEMPTS
    base: float = 5.0  # delay after the first failure, before jitter
    factor: float = 2.0
    cap: float = 3600.0
    jitter: float = 0.5  # the delay is drawn from [d * (1 - jitter), d]
    # Waiting for a person (new authorization, amoCRM unblocking the account): no point hurrying.
    reauth_delay: float = PERSON_WAIT
    person_backoff: bool = True  # the wait for a person grows with the backoff once that is longer
    rate_limit_floor: float = 1.0  # the least wait after a 429 that named its Retry-After
    spread: float = 1.0  # up to this many seconds added to a Retry-After, so workers come back apart
    waits_count: bool = True  # a 429 or a wait for a person counts as an attempt

    @property
    def backoff(self) -> Backoff:
        return Backoff(base=self.base, cap=self.cap, factor=self.factor, jitter=self.jitter)


@dataclass(frozen=True)
class Decision:
    wait: float | None  # seconds until the next attempt; None: give up
    counts: bool  # this attempt counts toward ``max_attempts``


def decide(error: BaseException, attempt: int, policy: RetryPolicy, rand: float) -> Decision:
    """After attempt ``attempt`` (1-based) failed with ``error``: wait, count, or give up.

    ``PermanentError``: give up. A 401 refused before a refresh: again at once (an attempt, so a
    401 loop ends). A 429: amoCRM's Retry-After, or ``RATE_LIMITED`` without one. Only a person
    can help (``needs_person``): ``reauth_delay``. Anything else: the backoff. An attempt that
    counts and reaches ``max_attempts`` gives up.
    """
    if isinstance(error, PermanentError):
        return Decision(None, True)
    counts = True
    if isinstance(error, RefusedBeforeRefresh):
        wait = 0.0
    elif isinstance(error, RateLimited):
        if error.retry_after is None:
            wait = RATE_LIMITED.delay(attempt, rand)
        else:
            wait = max(error.retry_after, policy.rate_limit_floor) + policy.spread * rand
        counts = policy.waits_count
    elif needs_person(error):
        wait = policy.reauth_delay
        if policy.person_backoff:
            wait = max(wait, policy.backoff.delay(attempt, rand))
        counts = policy.waits_count
    else:
        wait = policy.backoff.delay(attempt, rand)
    if counts and attempt >= policy.max_attempts:
        return Decision(None, True)
    return Decision(wait, counts)


# An event whose handler failed: 5 s doubling up to an hour, jittered by half; every failure counts.
EVENTS = RetryPolicy()
# A batch of actions amoCRM did not take (ACTIONS' numbers). A 429 or a wait for a person is not
# an attempt: nothing was wrong with the actions. A Retry-After is waited exactly.
ACTIONS_POLICY = RetryPolicy(
    base=ACTIONS.base,
    cap=ACTIONS.cap,
    factor=ACTIONS.factor,
    jitter=ACTIONS.jitter,
    person_backoff=False,
    rate_limit_floor=0.0,
    spread=0.0,
    waits_count=False,
)
