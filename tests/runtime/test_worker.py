"""The worker: the retry policy (pure), handlers and their context, leases, and `amohook worker`."""

from __future__ import annotations

import json
import textwrap
import threading
import time

import pytest

from amohook import inbox
from amohook.errors import AccountBlocked, ConfigError, RateLimited, TokenRevoked
from amohook.retry import RATE_LIMITED, RetryPolicy, decide
from amohook.store.models import Attempt, Event
from amohook.worker import (
    PermanentError,
    Registry,
    Worker,
    error_excerpt,
    load_handler,
)
from tests.conftest import cli_env, run_cli
from tests.helpers.deliveries import NOW, incoming, lead_body

POLICY = RetryPolicy(max_attempts=5, base=10.0, factor=2.0, cap=100.0, jitter=0.5)


def retry_delay(attempt: int, error: BaseException, policy: RetryPolicy, rand: float) -> float | None:
    """The wait ``retry.decide`` sets for an event (None: dead)."""
    return decide(error, attempt, policy, rand).wait


# -- the retry policy --------------------------------------------------------------------------
def test_backoff_doubles_until_the_cap():
    assert [POLICY.backoff.delay(n, 0.0) for n in range(1, 7)] == [10, 20, 40, 80, 100, 100]


def test_jitter_takes_off_at_most_the_jitter_share():
    assert POLICY.backoff.delay(3, 0.0) == 40
    assert POLICY.backoff.delay(3, 0.999) == pytest.approx(20.02)
    assert POLICY.backoff.delay(3, 0.5) == 30


def test_a_rate_limit_waits_what_amocrm_asked_for():
    assert retry_delay(1, RateLimited("429", retry_after=7.0), POLICY, 0.0) == 7.0
    assert retry_delay(1, RateLimited("429", retry_after=7.0), POLICY, 0.5) == 7.5
    assert retry_delay(1, RateLimited("429", retry_after=None), POLICY, 0.0) == RATE_LIMITED.delay(1, 0.0)
    assert retry_delay(1, RateLimited("429", retry_after=0.0), POLICY, 0.0) == POLICY.rate_limit_floor


def test_a_revoked_grant_or_blocked_account_waits_for_a_human():
    assert retry_delay(1, TokenRevoked("example"), POLICY, 0.0) == POLICY.reauth_delay
    assert retry_delay(1, AccountBlocked("blocked"), POLICY, 0.0) == POLICY.reauth_delay


def test_a_permanent_error_or_the_last_attempt_means_dead():
    assert retry_delay(1, PermanentError("bad data"), POLICY, 0.0) is None
    assert retry_delay(5, RuntimeError("x"), POLICY, 0.0) is None
    assert retry_delay(4, RuntimeError("x"), POLICY, 0.0) == 80


def test_the_error_excerpt_names_the_handler_and_where_it_failed():
    try:
        raise ValueError("bad\n  value")
    except ValueError as exc:
        text = error_excerpt("rules", exc)
    assert text.startswith("rules: ValueError: bad value (at test_worker.py:")
    assert len(error_excerpt("h", ValueError("x" * 5000))) == 1000


# -- handlers ----------------------------------------------------------------------------------
def test_registry_keeps_order_and_refuses_duplicate_names():
    registry = Registry()
    registry.register("a", lambda e, c: None)
    registry.register("b", lambda e, c: None)
    assert registry.names() == ["a", "b"] and "a" in registry and len(registry) == 2
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", lambda e, c: None)
    with pytest.raises(TypeError):
        registry.register("c", "not callable")


def test_load_handler_imports_module_function(tmp_path, monkeypatch):
    (tmp_path / "myhooks.py").write_text(
        "class H:\n    @staticmethod\n    def run(event, ctx):\n        return 1\nX = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_handler("myhooks:H.run")(None, None) == 1
    for spec, message in [
        ("myhooks", "package.module:function"),
        ("nosuchmodule_xyz:run", "cannot import handler module"),
        ("myhooks:nope", "has no 'nope'"),
        ("myhooks:X", "not callable"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_handler(spec)


# -- the worker --------------------------------------------------------------------------------
class Clock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_worker(store, *handlers, clock=None, **kw):
    registry = Registry()
    for i, fn in enumerate(handlers):
        registry.register(f"h{i}", fn)
    kw.setdefault("max_attempts", 5)
    return Worker(
        store, registry, kw.pop("worker_id", "w1"), clock=clock or Clock(), rand=lambda: 0.0, policy=POLICY, **kw
    )


def put(store, count: int = 1, received_at: float = NOW):
    inbox.store_deliveries(store, [incoming(lead_body(1000 + i), received_at=received_at) for i in range(count)])


def test_a_handled_event_is_done_with_one_ok_attempt(store):
    put(store, 2)
    seen = []
    worker = make_worker(
        store, lambda event, ctx: seen.append((event.id, event.entity, event.data["id"], ctx.event.id))
    )
    assert worker.run_once() == 2
    worker.close()
    assert seen == [(1, "leads", "1000", 1), (2, "leads", "1001", 2)]
    assert [(e.status, e.attempts, e.lease_owner) for e in Event.select()] == [("done", 1, None)] * 2
    assert [(a.outcome, a.worker) for a in Attempt.select()] == [("ok", "w1")] * 2
    assert worker.run_once() == 0


def test_every_handler_runs_in_order_and_the_first_failure_stops_the_event(store):
    put(store)
    calls = []

    def boom(event, ctx):
        calls.append("b")
        raise RuntimeError("nope")

    worker = make_worker(store, lambda e, c: calls.append("a"), boom, lambda e, c: calls.append("c"))
    worker.run_once()
    worker.close()
    assert calls == ["a", "b"]
    event = Event.get()
    assert event.status == "pending" and event.last_error.startswith("h1: RuntimeError: nope")


def test_a_failure_is_retried_with_backoff_until_dead(store):
    put(store)
    clock = Clock()

    def always_fails(event, ctx):
        raise RuntimeError(f"attempt {event.attempts + 1}")

    worker = make_worker(store, always_fails, clock=clock)
    delays = []
    for _ in range(5):
        before = clock.now
        assert worker.run_once() == 1
        event = Event.get()
        if event.status == "pending":
            delays.append(event.next_attempt_at - before)
            assert worker.run_once() == 0  # not due yet
            clock.now = event.next_attempt_at
    worker.close()
    assert delays == [10, 20, 40, 80]
    event = Event.get()
    assert event.status == "dead" and event.attempts == 5 and "attempt 5" in event.last_error
    assert [a.outcome for a in Attempt.select().order_by(Attempt.id)] == ["retry"] * 4 + ["dead"]


def test_a_rate_limited_handler_is_retried_after_retry_after(store):
    put(store)

    def limited(event, ctx):
        raise RateLimited("429", retry_after=12.0)

    worker = make_worker(store, limited)
    worker.run_once()
    worker.close()
    assert Event.get().next_attempt_at == NOW + 12.0


def test_a_permanent_error_is_dead_at_once(store):
    put(store)

    def reject(event, ctx):
        raise PermanentError("no such pipeline")

    worker = make_worker(store, reject)
    worker.run_once()
    worker.close()
    event = Event.get()
    assert event.status == "dead" and event.attempts == 1 and "no such pipeline" in event.last_error


def test_a_worker_without_handlers_claims_nothing(store):
    put(store)
    with pytest.raises(ConfigError, match="--handler"):
        Worker(store, Registry(), "w").run_once()
    assert Event.get().status == "pending"


def test_a_crashed_workers_event_is_run_again_after_the_lease(store):
    put(store)
    clock = Clock()
    inbox.claim(store, "crashed", limit=10, lease_seconds=60, max_attempts=5, now=clock.now)
    seen = []
    worker = make_worker(store, lambda e, c: seen.append(e.attempts), clock=clock)
    assert worker.run_once() == 0
    clock.now += 61
    assert worker.run_once() == 1
    worker.close()
    assert seen == [1]
    assert [a.outcome for a in Attempt.select().order_by(Attempt.id)] == ["expired", "ok"]


def test_a_result_after_the_lease_was_lost_is_not_recorded_as_done(store):
    put(store)

    def taken_over(event, ctx):  # meanwhile another worker took the event over
        Event.update(lease_owner="other").where(Event.id == event.id).execute()

    worker = make_worker(store, taken_over)
    worker.run_once()
    worker.close()
    event = Event.get()
    assert (event.status, event.lease_owner, event.attempts) == ("running", "other", 0)
    assert Attempt.get().outcome == "lost"


def test_stopping_releases_the_claimed_events_not_yet_started(store):
    put(store, 4)
    stop = threading.Event()
    seen = []

    def first_then_stop(event, ctx):
        seen.append(event.id)
        stop.set()

    worker = make_worker(store, first_then_stop)
    worker.run(stop)
    assert seen == [1]
    rows = list(Event.select().order_by(Event.id))
    assert [r.status for r in rows] == ["done", "pending", "pending", "pending"]
    assert all(r.lease_owner is None and r.attempts == 0 for r in rows[1:])


@pytest.mark.slow
def test_a_long_handler_keeps_its_lease_alive(store):
    put(store, 2, received_at=time.time())
    other_claims = []

    def slow(event, ctx):
        if event.id == 1:
            for _ in range(4):
                time.sleep(0.25)
                other_claims.extend(
                    inbox.claim(store, "other", limit=10, lease_seconds=5, max_attempts=5, now=time.time())
                )

    worker = Worker(store, _registry(slow), "w1", lease_seconds=0.3, max_attempts=5)
    assert worker.run_once() == 2
    worker.close()
    assert other_claims == []
    assert [(e.status, e.attempts) for e in Event.select()] == [("done", 1), ("done", 1)]
    assert [a.outcome for a in Attempt.select()] == ["ok", "ok"]


def test_a_handler_stuck_past_the_limit_loses_its_lease(store):
    put(store, received_at=time.time())
    taken = []

    def stuck(event, ctx):
        deadline = time.monotonic() + 3
        while not taken and time.monotonic() < deadline:
            time.sleep(0.1)
            taken.extend(inbox.claim(store, "other", limit=1, lease_seconds=5, max_attempts=5, now=time.time()))

    worker = Worker(store, _registry(stuck), "w1", lease_seconds=0.3, max_attempts=5, max_handler_seconds=0.5)
    worker.run_once()
    worker.close()
    assert [e.id for e in taken] == [1]
    assert Event.get().lease_owner == "other"


def _registry(fn):
    registry = Registry()
    registry.register("h", fn)
    return registry


def test_the_context_offers_an_api_client_for_the_events_account(store, fake, account):
    inbox.store_deliveries(store, [incoming(lead_body(5), received_at=time.time())])
    got = []

    def handler(event, ctx):
        got.append(ctx.client().get("/api/v4/account")["id"])
        assert ctx.client() is ctx.client("example")
        assert ctx.store is store

    worker = Worker(store, _registry(handler), "w1")
    worker.run_once()
    worker.close()
    assert got == [fake.account_id] and Event.get().status == "done"


def test_the_context_refuses_an_event_without_an_account(store):
    inbox.store_deliveries(store, [incoming(b"leads%5Badd%5D%5B0%5D%5Bid%5D=1")])
    worker = make_worker(store, lambda e, c: c.client())
    worker.run_once()
    worker.close()
    event = Event.get()
    assert event.status == "dead" and "names no account" in event.last_error


# -- `amohook worker` --------------------------------------------------------------------------
HANDLERS = textwrap.dedent(
    """
    import json, os

    def record(event, ctx):
        with open(os.environ["RECORD_TO"], "a") as f:
            f.write(json.dumps([event.id, event.entity, event.entity_id]) + "\\n")

    def fail(event, ctx):
        raise RuntimeError("always")
    """
)


@pytest.fixture
def handler_env(tmp_path, sqlite_url):
    (tmp_path / "hooks_for_test.py").write_text(HANDLERS)
    from tests.conftest import ROOT

    env = cli_env(sqlite_url, PYTHONPATH=f"{ROOT}:{tmp_path}", RECORD_TO=str(tmp_path / "record.jsonl"))
    return env


@pytest.mark.slow
def test_worker_once_processes_what_is_due_and_exits(sqlite_url, handler_env, tmp_path):
    from amohook.store import open_store

    store = open_store(sqlite_url)
    put(store, 3, received_at=time.time())
    result = run_cli(["worker", "--once", "--handler", "hooks_for_test:record"], sqlite_url, env=handler_env)
    assert result.returncode == 0, result.stderr
    assert "processed 3 event(s)" in result.stdout
    lines = [json.loads(line) for line in (tmp_path / "record.jsonl").read_text().splitlines()]
    assert lines == [[1, "leads", "1000"], [2, "leads", "1001"], [3, "leads", "1002"]]
    assert {e.status for e in Event.select()} == {"done"}


@pytest.mark.slow
def test_worker_once_leaves_failures_scheduled_for_later(sqlite_url, handler_env):
    from amohook.store import open_store

    store = open_store(sqlite_url)
    put(store, 1, received_at=time.time())
    result = run_cli(
        ["worker", "--once", "--handler", "hooks_for_test:fail", "--max-attempts", "3"], sqlite_url, env=handler_env
    )
    assert result.returncode == 0, result.stderr
    event = Event.get()
    assert event.status == "pending" and event.attempts == 1 and "RuntimeError: always" in event.last_error
    assert "Traceback" in result.stderr  # a handler bug is logged with its stack, for the operator


@pytest.mark.slow
def test_worker_needs_a_handler_that_imports(sqlite_url, handler_env):
    none = run_cli(["worker", "--once"], sqlite_url, env=handler_env)
    assert none.returncode == 2 and "--handler" in none.stderr
    bad = run_cli(["worker", "--once", "--handler", "no_such_module_q:run"], sqlite_url, env=handler_env)
    assert bad.returncode == 2 and "cannot import handler module 'no_such_module_q'" in bad.stderr
    assert "Traceback" not in bad.stderr
