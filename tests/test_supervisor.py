"""The supervisor on its own: loops of our making, started, reported on, stopped within one deadline."""

from __future__ import annotations

import threading
import time

import pytest

from amohook.runtime.loop import STOP_SECONDS, Loop, Periodic, StopEvent
from amohook.runtime.supervisor import Supervisor


class Ticking:
    """A loop that counts until stopped, then takes ``wind_down`` seconds to finish."""

    def __init__(self, name: str, wind_down: float = 0.0):
        self.name = name
        self.wind_down = wind_down
        self.ticks = 0
        self.saw_stop_at: float | None = None
        self.ended = threading.Event()

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(0.01):
            self.ticks += 1
        self.saw_stop_at = time.monotonic()
        time.sleep(self.wind_down)
        self.ended.set()

    def health(self) -> dict:
        return {"ticks": self.ticks}


class Dying:
    """A loop that raises after ``after`` seconds (every time it is run)."""

    def __init__(self, name: str = "dying", after: float = 0.05, error: BaseException | None = None):
        self.name = name
        self.after = after
        self.error = error or RuntimeError("a bug in a loop")
        self.runs = 0

    def run(self, stop: threading.Event) -> None:
        self.runs += 1
        if not stop.wait(self.after):
            raise self.error

    def health(self) -> dict:
        return {"runs": self.runs}


@pytest.fixture
def sqlite_store(sqlite_url):
    from amohook.store import open_store

    s = open_store(sqlite_url)
    yield s
    s.close()


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_fake_loops_are_loops():
    assert isinstance(Ticking("t"), Loop) and isinstance(Dying(), Loop)
    assert isinstance(Periodic("p", lambda stop: None, 1.0), Loop)


def test_stop_reaches_every_loop_at_once_and_all_end_within_the_one_deadline(sqlite_store):
    loops = [Ticking("a"), Ticking("b", wind_down=0.5), Ticking("c")]
    runner = Supervisor(sqlite_store, loops=loops).start()
    assert wait_for(lambda: all(loop.ticks for loop in loops))
    asked = time.monotonic()
    runner.stop()
    took = time.monotonic() - asked
    assert all(loop.ended.is_set() for loop in loops)
    seen = [loop.saw_stop_at - asked for loop in loops if loop.saw_stop_at is not None]
    assert len(seen) == 3 and max(seen) < 0.5  # one stop for all, not one after another
    assert 0.5 <= took < STOP_SECONDS


def test_a_loop_still_busy_at_the_deadline_is_named_and_left(sqlite_store, caplog):
    slow = Ticking("slow", wind_down=1.0)
    runner = Supervisor(sqlite_store, loops=[slow])
    runner._stop = StopEvent(seconds=0.2)  # a short deadline, so the test does not wait 9 s
    runner.start()
    assert wait_for(lambda: slow.ticks > 0)
    asked = time.monotonic()
    runner.stop()
    assert time.monotonic() - asked < 0.9
    assert "still running" in caplog.text and "slow" in caplog.text
    assert slow.ended.wait(2)


def test_each_loops_health_is_reported_with_its_state(sqlite_store):
    ticking = Ticking("ticking")
    runner = Supervisor(sqlite_store, loops=[ticking]).start()
    try:
        assert wait_for(lambda: ticking.ticks >= 3)
        health = runner.health()
    finally:
        runner.stop()
    assert health["loops"]["ticking"]["state"] == "running"
    assert health["loops"]["ticking"]["ticks"] >= 3
    assert runner.health()["loops"]["ticking"]["state"] == "stopped"


def test_a_periodic_loop_reports_passes_and_a_failed_pass_without_dying(sqlite_store, caplog):
    calls = []

    def step(stop):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the store is down")

    periodic = Periodic("sweep", step, every=0.02)
    runner = Supervisor(sqlite_store, loops=[periodic]).start()
    try:
        assert wait_for(lambda: len(calls) >= 4)
        health = runner.health()["loops"]["sweep"]
    finally:
        runner.stop()
    assert health["state"] == "running" and health["failures"] == 1 and health["passes"] >= 3
    assert "sweep pass failed (next in 0.02s): RuntimeError: the store is down" in caplog.text


def test_a_dying_loop_in_worker_mode_stops_the_rest_and_is_raised_by_stop(sqlite_store):
    ticking = Ticking("ticking")
    runner = Supervisor(sqlite_store, loops=[ticking, Dying()]).start()
    assert ticking.ended.wait(5)  # the death stopped its peers
    with pytest.raises(RuntimeError, match="a bug in a loop"):
        runner.stop()
