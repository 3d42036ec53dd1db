"""What `amohook serve` and `amohook worker` run, wired together and importable without the CLI.

A ``Supervisor`` holds the store, the handlers (the rules and/or your functions), the action sender,
the worker threads, the background reconciliation and pruning, and — when given a
``ServerConfig`` — the webhook listener. The CLI parses options and prints; everything else is
here, so another Python program runs the rules in a few lines::

    from amohook import Supervisor, open_store, stop_on_signals

    store = open_store("sqlite:////var/lib/amohook/amohook.db")
    Supervisor(store, rules="rules.toml").run_until(stop_on_signals())

Processing is at least once and actions are keyed (see the README's guarantees); stopping lets a
running handler finish and releases what was claimed but not started.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amohook.errors import ConfigError, LoopDied, describe
from amohook.retry import Backoff
from amohook.runtime.clients import ClientPool
from amohook.runtime.loop import STOP_SECONDS, Loop, StopEvent, remaining
from amohook.settings import (
    BATCH_SIZE,
    HANDLER_CLIENT_ATTEMPTS,
    LEASE_SECONDS,
    MAX_ATTEMPTS,
    POLL_SECONDS,
    RECONCILE_CLIENT_ATTEMPTS,
    RECONCILE_EVERY,
    SENDER_CLIENT_ATTEMPTS,
)
from amohook.worker import Registry, Worker, load_handler, new_worker_id

if TYPE_CHECKING:  # imported where used: `worker` runs without the listener
    from amohook.recovery.reconcile import Reconciler
    from amohook.store import Store
    from amohook.webhooks.server import WebhookService

log = logging.getLogger("amohook.runner")

HandlerSpec = str | Callable[..., Any]  # "package.module:function", or the function itself

# A loop that dies is started again after 1, 2, 4 s, at most 3 times in a row; one that ran for
# 10 minutes before dying starts the count again. Then the process stops (see Supervisor._run).
MAX_RESTARTS = 3
HEALTHY_AFTER = 600.0
RESTART_WAIT = Backoff(base=1.0, cap=30.0, jitter=0.0)


def build_registry(
    handlers: Iterable[HandlerSpec] | None = None,
    rules: str | Path | None = None,
    store: Store | None = None,
    *,
    journal: bool = False,
    search_dir: str | None = None,
    clients: ClientPool | None = None,
):
    """The handler registry, and the action sender when there are rules (else None).

    Invalid rules or a handler that cannot be imported raise here (``ConfigError``), before
    anything starts. ``journal`` records lead changes for reconciliation when only handlers run.
    ``search_dir`` is where handler modules may also live (the CLI passes the working directory),
    searched last and only for these imports. ``clients``: the pool the sender takes its
    clients from (default: a new one).
    """
    registry = Registry()
    sender = None
    handlers = list(handlers or [])
    if store is None and (rules or (journal and handlers)):
        raise TypeError("build_registry: rules and the change journal need the store")
    if rules:
        from amohook.actions import ActionSender
        from amohook.rules import load_and_compile
        from amohook.rules.handler import RulesHandler

        assert store is not None  # checked above
        compiled = load_and_compile(str(rules))
        pool = clients if clients is not None else ClientPool(store)

        def client(sub: str):
            # A 429 or a failure comes back to the sender, which reschedules the batch instead of
            # sleeping inside its lease.
            return pool.get(sub, max_attempts=SENDER_CLIENT_ATTEMPTS)

        sender = ActionSender(store, client, log=logging.getLogger("amohook.actions").warning)
        registry.register("rules", RulesHandler(compiled, store, on_recorded=lambda n: sender.wake()))
    elif journal and handlers:
        from amohook.recovery.identity import ChangeJournal

        assert store is not None  # checked above
        registry.register("amohook.changes", ChangeJournal(store))
    for spec in handlers:
        if isinstance(spec, str):
            registry.register(spec, load_handler(spec, search_dir=search_dir))
        else:
            registry.register(_handler_name(spec), spec)
    return registry, sender


def _handler_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}:{getattr(fn, '__qualname__', None) or type(fn).__name__}"


def stop_on_signals() -> StopEvent:
    """SIGTERM/SIGINT set the returned event; a second one exits at once. Main thread only."""
    import os

    stop = StopEvent()

    def handler(signum, frame):
        if stop.is_set():
            os._exit(130)
        stop.signal = signal.Signals(signum).name
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


class Supervisor:
    """The handlers, the sender, the workers, reconciliation, pruning and (optionally) the listener.

    ``rules`` is a rules file (TOML); ``handlers`` are ``"package.module:function"`` strings or
    callables ``fn(event, ctx)``. ``listen`` (a ``webhooks.server.ServerConfig``) adds the webhook
    listener, as `amohook serve`; without it the supervisor only processes, as `amohook worker`.
    ``reconcile_every`` and ``keep`` are seconds (None: off); ``loops`` are more loops of your own
    (``runtime.loop.Loop``), run and stopped with the rest. Nothing starts until ``start``;
    invalid rules raise in the constructor.

    Each of these is a loop (``runtime.loop.Loop``) in a thread of its own; ``stop`` ends them all
    within one deadline (``STOP_SECONDS``), and ``health()`` is what each reports.
    """

    def __init__(
        self,
        store: Store,
        *,
        rules: str | Path | None = None,
        handlers: Iterable[HandlerSpec] = (),
        threads: int = 1,
        listen=None,
        reconcile_every: float | None = None,
        keep: float | None = None,
        lease_seconds: float = LEASE_SECONDS,
        max_attempts: int = MAX_ATTEMPTS,
        batch_size: int = BATCH_SIZE,
        poll_interval: float = POLL_SECONDS,
        journal: bool | None = None,
        search_dir: str | None = None,
        loops: Iterable[Loop] = (),
    ):
        self.store = store
        self.extra_loops = list(loops)
        self.listen = listen
        self.reconcile_every = reconcile_every
        self.keep = keep
        self.clients = ClientPool(store)
        self.registry, self.sender = build_registry(
            handlers,
            rules,
            store,
            journal=reconcile_every is not None if journal is None else journal,
            search_dir=search_dir,
            clients=self.clients,
        )
        prefix = "serve" if listen is not None else "worker"
        count = threads if len(self.registry) else 0  # nothing to run: events stay pending
        self.workers = [
            Worker(
                store,
                self.registry,
                new_worker_id(f"{prefix}{i}"),
                lease_seconds=lease_seconds,
                max_attempts=max_attempts,
                batch_size=batch_size,
                poll_interval=poll_interval,
                client_factory=self._handler_client,
            )
            for i in range(count)
        ]
        self.service: WebhookService | None = None
        self.errors: list[BaseException] = []
        self._stop = StopEvent()  # every loop's; its deadline is the one they all stop within
        self._loops: list[tuple[Loop, threading.Thread]] = []
        self._states: dict[str, dict[str, Any]] = {}  # per loop: state, restarts, last error
        self.max_restarts = MAX_RESTARTS
        self.restart_wait = RESTART_WAIT
        self.reconciler: Reconciler | None = None
        self._started = False

    @property
    def stale(self):
        """The stale check of the lead.stale rules (``amohook.rules.stale``), or None without any."""
        from amohook.rules.handler import RulesHandler
        from amohook.rules.stale import StaleCheck

        for _, handler in self.registry.items():
            if isinstance(handler, RulesHandler):
                check = StaleCheck(self.store, handler.rules)
                return check if check else None
        return None

    def _after_pass(self):
        """What runs after each reconciliation pass: the stale check, built once per reconciler."""
        check = self.stale
        return check.after_pass if check is not None else None

    @property
    def url(self) -> str:
        """The listener's base URL (with ``listen``, once started)."""
        if self.service is None:
            raise RuntimeError("the listener is not running")
        return self.service.url

    @property
    def reconciling(self) -> bool:
        return self.reconciler is not None

    def _handler_client(self, store: Store, account: str):
        return self.clients.get(account, max_attempts=HANDLER_CLIENT_ATTEMPTS)

    def start(self) -> Supervisor:
        """Start every loop in the background; returns at once. ``OSError``: cannot listen."""
        loops: list[Loop] = []
        if self.listen is not None:
            from amohook.webhooks.server import WebhookService

            self.service = WebhookService(self.store, self.listen, on_commit=self._wake_workers, runtime=self.health)
            self.service.start()
            self.store.close()  # the main thread's connection; every thread of the service opens its own
            loops.append(self.service)
        loops += self.workers
        if self.workers:
            if self.sender is not None:
                loops.append(self.sender)
            if self.reconcile_every is not None:
                from amohook.recovery.reconcile import Reconciler

                self.reconciler = Reconciler(
                    self.store,
                    self.reconcile_every,
                    client_factory=self._reconcile_client,
                    listening=self.listen is not None,
                    after_pass=self._after_pass(),
                )
                loops.append(self.reconciler.loop())
            elif self.stale is not None:
                log.warning(
                    "lead.stale rules are checked after each reconciliation pass: --reconcile is off, so they never"
                    " fire"
                )
        if self.keep is not None:
            from amohook.ops.retention import pruner

            loops.append(pruner(self.store, self.keep))
        loops += self.extra_loops
        for loop in loops:
            self._states[loop.name] = {"state": "running", "restarts": 0, "last_error": None}
            thread = threading.Thread(target=self._run, args=(loop,), name=f"amohook-{loop.name}", daemon=True)
            self._loops.append((loop, thread))
            thread.start()
        self._started = True
        return self

    def _reconcile_client(self, store: Store, account: str):
        return self.clients.get(account, max_attempts=RECONCILE_CLIENT_ATTEMPTS)

    def _run(self, loop: Loop) -> None:
        """Run ``loop`` until the stop; a death is handled the same way in `serve` and `worker`.

        The traceback goes to the log at ERROR and the loop starts again after a pause
        (``RESTART_WAIT``), at most ``max_restarts`` times in a row (a loop that ran
        ``HEALTHY_AFTER`` seconds before dying starts the count again). Then, or at once for a
        ``ConfigError`` (a person must act), every loop stops and ``stop()`` raises, so the
        process exits non-zero and systemd's ``Restart=`` starts it afresh. Why not carry on
        without it: a listener whose workers are all dead answers 200 and processes nothing.
        """
        state = self._states[loop.name]
        in_a_row = 0
        while True:
            started = time.monotonic()
            try:
                loop.run(self._stop)
                if self._stop.is_set():
                    state["state"] = "stopped"
                    return
                error: BaseException = RuntimeError("it returned before it was asked to stop")
            except BaseException as exc:  # SystemExit from a handler too: one loop must not end the process silently
                error = exc
            state["last_error"] = describe(error)
            log.error("the %s loop died: %s", loop.name, describe(error), exc_info=error)
            if self._stop.is_set():
                state["state"] = "stopped"
                return
            if time.monotonic() - started >= HEALTHY_AFTER:
                in_a_row = 0
            if isinstance(error, ConfigError) or in_a_row >= self.max_restarts:
                state["state"] = "died"
                self.errors.append(
                    error if isinstance(error, ConfigError) else LoopDied(loop.name, in_a_row + 1, error)
                )
                log.error("stopping amohook: the %s loop died %d time(s) in a row", loop.name, in_a_row + 1)
                self._stop.set()
                return
            in_a_row += 1
            state["restarts"] += 1
            state["state"] = "restarting"
            wait = self.restart_wait.delay(in_a_row)
            log.error("restarting the %s loop in %.0f s (%d of %d)", loop.name, wait, in_a_row, self.max_restarts)
            if self._stop.wait(wait):
                state["state"] = "stopped"
                return
            state["state"] = "running"

    def _wake_workers(self, _count: int) -> None:
        for worker in self.workers:
            worker.wake()

    def health(self) -> dict[str, Any]:
        """Each loop's figures and state; the events run by outcome; amoCRM requests per account."""
        loops: dict[str, dict[str, Any]] = {}
        processed: dict[str, int] = {}
        for loop, thread in self._loops:
            figures = dict(loop.health())
            figures.update(self._states[loop.name])
            if not thread.is_alive() and figures["state"] == "running":
                figures["state"] = "stopped"
            loops[loop.name] = figures
        for worker in self.workers:
            for outcome, count in worker.health()["outcomes"].items():
                processed[outcome] = processed.get(outcome, 0) + count
        return {"loops": loops, "events_processed": processed, "amocrm": self.clients.health()}

    def wait(self, stop: threading.Event) -> None:
        """Block until ``stop`` is set or a loop that kept dying stopped the supervisor."""
        if not self._loops:
            return
        while not self._stop.is_set() and not stop.wait(0.1):
            pass

    def stop(self) -> None:
        """Stop every loop within ``STOP_SECONDS``: running handlers finish, claimed events are
        released, the listener answers and commits what it read, the sender's batch in flight
        usually completes (if not, its actions stay `sending` and are looked up before being sent
        again). Raises ``LoopDied`` (or the ``ConfigError``) when a loop kept dying."""
        self._stop.set()
        for _loop, thread in self._loops:
            thread.join(self._stop.remaining())
        busy = [loop.name for loop, thread in self._loops if thread.is_alive()]
        if busy:
            log.warning(
                "still running after %.0f s: %s; a running event is retried after its lease",
                STOP_SECONDS,
                ", ".join(busy),
            )
        if self.errors:
            raise self.errors[0]

    def run_until(self, stop: threading.Event) -> None:
        """``start``, wait for ``stop`` (e.g. ``stop_on_signals()``), then ``stop``."""
        if not self._started:
            self.start()
        try:
            self.wait(stop)
        finally:
            self.stop()

    def run_once(self, stop: threading.Event | None = None, *, reconcile: bool = False) -> int:
        """Process what is due now and send the tasks it recorded, then return how many events ran
        (`amohook worker --once`). ``reconcile`` first queues what amoCRM's events log has that
        no webhook brought."""
        if reconcile:
            from amohook.recovery.reconcile import Reconciler

            Reconciler(
                self.store,
                self.reconcile_every or RECONCILE_EVERY,
                client_factory=self._reconcile_client,
                after_pass=self._after_pass(),
            ).run_once()
        stop = stop or self._stop

        def drain(worker: Worker) -> None:
            try:
                worker.drain(stop)
            except BaseException as exc:
                self.errors.append(exc)
                stop.set()

        threads = [threading.Thread(target=drain, args=(w,), name=w.worker_id, daemon=True) for w in self.workers]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads) and not stop.wait(0.1):
            pass
        deadline = time.monotonic() + remaining(stop)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.errors:
            raise self.errors[0]
        if self.sender is not None:
            self.sender.drain()  # send the tasks the events just recorded
        return sum(w.processed for w in self.workers)
