"""The one backoff formula every retry in amohook uses, and how long to wait for a person.

Each caller keeps its own numbers (a read retried within a request waits half a second; an event
that failed waits minutes; an action amoCRM refused waits longer) but they all grow the same way:
exponentially from ``base`` by ``factor``, capped at ``cap``, then jittered down by up to
``jitter`` of the delay so that many workers that failed together do not come back together.
Pure: ``rand`` is passed in, so the delays are tested without clocks or randomness.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

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
