"""amoCRM's 7 requests per second, shared through the store by every process on it."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time

import pytest

from amohook.amocrm.ratelimit import MARGIN, PER, RATE, SharedRateLimiter, decide
from amohook.store.models import RateWindow
from tests.conftest import ROOT, cli_env

pytestmark = pytest.mark.amocrm_rate  # amoCRM's real 7 a second, not the suite's faster TEST_RATE


class Clock:
    """A clock whose sleep moves it forward: the limiter's waits cost no real time."""

    def __init__(self, now: float = 1_750_000_000.0):
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


# -- the pure core -----------------------------------------------------------------------------
def test_decide_grants_until_the_window_is_full():
    grants: list[float] = []
    for i in range(7):
        ok, wait, grants = decide(grants, 100.0 + i * 0.01, 7, 1.0)
        assert ok and wait == 0.0
    ok, wait, kept = decide(grants, 100.07, 7, 1.0)
    assert not ok and wait == pytest.approx(0.93) and kept == grants


def test_decide_forgets_grants_older_than_the_window():
    ok, wait, kept = decide([98.0, 98.5, 99.2], 100.0, 2, 1.0)
    assert ok and kept == [99.2, 100.0]


def test_decide_waits_for_the_oldest_grant_that_blocks():
    ok, wait, _ = decide([99.5, 99.6, 99.7], 100.0, 2, 1.0)
    assert not ok and wait == pytest.approx(0.6)  # 99.6 (second newest) leaves the window at 100.6


# -- shared through the store ------------------------------------------------------------------
def test_eight_requests_take_one_window_and_the_eighth_waits(store):
    clock = Clock()
    limiter = SharedRateLimiter(store, clock=clock, sleep=clock.sleep)
    start = clock.now
    times = []
    for _ in range(8):
        limiter.acquire("example")
        times.append(clock.now)
    assert times[:7] == [start] * 7
    assert times[7] - start == pytest.approx(PER + MARGIN, abs=0.02)


def test_two_limiters_on_one_store_share_the_window_and_accounts_do_not(store):
    clock = Clock()
    a = SharedRateLimiter(store, clock=clock, sleep=clock.sleep)
    b = SharedRateLimiter(store, clock=clock, sleep=clock.sleep)
    for i in range(RATE):
        (a if i % 2 else b).acquire("example")
    b.acquire("other")  # another account has its own window
    assert clock.slept == []
    a.acquire("example")
    assert clock.slept and sum(clock.slept) >= PER + MARGIN - 0.001
    assert RateWindow.select().count() == 2


@pytest.mark.slow
def test_a_waiting_limiter_does_not_hold_the_database(store):
    """While one caller waits for a slot, others (the webhook listener) can still write.

    Threads of one process, each with its own connection (peewee's are per thread); one Store per
    process is the store's contract."""
    limiter = SharedRateLimiter(store)
    for _ in range(RATE):
        limiter.acquire("example")
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(limiter.acquire("example")))
    waiter.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    with store.write():
        RateWindow.insert(key="unrelated", grants="[]").execute()
    assert time.monotonic() - t0 < 0.5
    waiter.join(5)
    assert not waiter.is_alive() and waited == [None]


# -- three processes, one account --------------------------------------------------------------
CALLER = """
import sys, time
from amohook.store import open_store
from amohook.amocrm.client import client_for
store = open_store(sys.argv[1])
client = client_for(store, "example")
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
for _ in range(int(sys.argv[3])):
    assert client.get("/api/v4/account")["id"]
print(client.requests_made, client.rate_limited)
"""


@pytest.mark.slow
@pytest.mark.alone
def test_three_processes_together_never_exceed_seven_per_second(store, fake, account):
    per_process = 15
    start = time.time() + 1.5  # all three are imported and connected by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CALLER, store.url, str(start), str(per_process)],
            env=cli_env(store.url),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert [out.split() for out, _ in outs] == [[str(per_process), "0"]] * 3
    assert len(fake.requests_to("/api/v4/account")) == 3 * per_process
    assert fake.count_429 == 0
    assert fake.max_in_window(1.0) <= RATE
    # and the limit was used, not just respected: 45 requests at 7 per (1 + margin) seconds
    arrivals = sorted(r.mono for r in fake.requests_to("/api/v4/account"))
    floor = (math.ceil(3 * per_process / RATE) - 1) * (PER + MARGIN)
    assert floor * 0.95 <= arrivals[-1] - arrivals[0] <= floor * 1.3 + 0.5
