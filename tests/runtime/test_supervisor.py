"""The supervisor on its own: loops of our making, started, reported on, stopped within one deadline."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from amohook.errors import ConfigError, ExitCode, LoopDied
from amohook.retry import Backoff
from amohook.runtime.loop import STOP_SECONDS, Loop, Periodic, StopEvent
from amohook.runtime.supervisor import Supervisor
from amohook.webhooks.server import ServerConfig

SECRET = "supervisor-test-secret-0123456789"


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
            raise type(self.error)(*self.error.args)  # a new one each time, as a real fault would

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


class DiesOnce(Ticking):
    """Dies on its first run, then ticks like any loop."""

    def __init__(self, name: str = "dies-once"):
        super().__init__(name)
        self.runs = 0

    def run(self, stop: threading.Event) -> None:
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("a passing fault")
        super().run(stop)


def supervisor(store, mode: str, loops: list, **kw) -> Supervisor:
    """A supervisor as `serve` (with the listener) or as `worker` runs it, with quick restarts."""
    listen = ServerConfig(secret=SECRET, port=0, **kw) if mode == "serve" else None
    runner = Supervisor(store, listen=listen, loops=loops)
    runner.restart_wait = Backoff(base=0.01, cap=0.01, jitter=0.0)
    return runner


@pytest.mark.parametrize("mode", ["serve", "worker"])
def test_a_loop_that_keeps_dying_is_restarted_three_times_then_stops_the_process(sqlite_store, mode, caplog):
    ticking, dying = Ticking("ticking"), Dying(after=0.02)
    runner = supervisor(sqlite_store, mode, [ticking, dying]).start()
    runner.wait(threading.Event())  # returns by itself: the supervisor gave up
    assert ticking.ended.wait(5)  # its peers were stopped
    with pytest.raises(LoopDied, match="the dying loop died 4 time") as raised:
        runner.stop()
    assert raised.value.exit_code == ExitCode.ERROR  # non-zero: systemd's Restart= takes over
    assert dying.runs == 4
    health = runner.health()["loops"]["dying"]
    assert health["state"] == "died" and health["restarts"] == 3
    assert "RuntimeError: a bug in a loop" in health["last_error"]
    deaths = [r for r in caplog.records if r.levelname == "ERROR" and r.getMessage().startswith("the dying loop died")]
    assert len(deaths) == 4 and all(r.exc_info for r in deaths)  # each traceback is in the log


@pytest.mark.parametrize("mode", ["serve", "worker"])
def test_a_loop_that_dies_once_is_restarted_and_the_process_goes_on(sqlite_store, mode):
    flaky = DiesOnce()
    runner = supervisor(sqlite_store, mode, [flaky]).start()
    try:
        assert wait_for(lambda: flaky.ticks > 0)
        health = runner.health()["loops"]["dies-once"]
        assert not runner.errors
    finally:
        runner.stop()  # raises nothing
    assert flaky.runs == 2 and health["state"] == "running" and health["restarts"] == 1


@pytest.mark.parametrize("mode", ["serve", "worker"])
def test_a_loop_dying_of_bad_configuration_stops_at_once_with_that_error(sqlite_store, mode):
    dying = Dying(error=ConfigError("no handlers are registered"))
    runner = supervisor(sqlite_store, mode, [dying]).start()
    runner.wait(threading.Event())
    with pytest.raises(ConfigError, match="no handlers are registered"):
        runner.stop()
    assert dying.runs == 1


def test_the_status_page_and_metrics_show_a_loop_restarting(sqlite_store):
    password = "correct-horse-battery-staple"
    dying = Dying(error=RuntimeError("<b>broken</b>"))
    runner = supervisor(sqlite_store, "serve", [dying], status_password=password)
    runner.restart_wait = Backoff(base=30.0, cap=30.0, jitter=0.0)  # it waits, restarting, while we look
    runner.start()
    try:
        assert wait_for(lambda: runner.health()["loops"]["dying"]["state"] == "restarting")
        page = requests.get(runner.url + "/status", auth=("admin", password), timeout=10).text
        metrics = requests.get(runner.url + "/metrics", auth=("admin", password), timeout=10).text
    finally:
        runner.stop()
    loops = page.split('id="loops"', 1)[1].split("</section>", 1)[0]
    assert "dying" in loops and "restarting" in loops and "&lt;b&gt;broken&lt;/b&gt;" in loops
    assert 'amohook_loop_up{loop="dying"} 0.0' in metrics and 'amohook_loop_restarts_total{loop="dying"} 1.0' in metrics
    assert 'amohook_loop_up{loop="listener"} 1.0' in metrics
