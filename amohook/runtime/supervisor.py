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

from amohook.worker import Registry, Worker, load_handler, new_worker_id

if TYPE_CHECKING:  # imported where used: `worker` runs without the listener
    from amohook.recovery.reconcile import Reconciler
    from amohook.store import Store
    from amohook.webhooks.server import WebhookService

log = logging.getLogger("amohook.runner")

HandlerSpec = str | Callable[..., Any]  # "package.module:function", or the function itself

SERVE_STOP_SECONDS = 9.0  # the listener's stop: requests answered, commits done, sender's batch
WORKER_STOP_SECONDS = 8.0  # running handlers finish within this, then the sender stops


def build_registry(
    handlers: Iterable[HandlerSpec] | None = None,
    rules: str | Path | None = None,
    store: Store | None = None,
    *,
    journal: bool = False,
    search_dir: str | None = None,
):
    """The handler registry, and the action sender when there are rules (else None).

    Invalid rules or a handler that cannot be imported raise here (``ConfigError``), before
    anything starts. ``journal`` records lead changes for reconciliation when only handlers run.
    ``search_dir`` is where handler modules may also live (the CLI passes the working directory),
    searched last and only for these imports.
    """
    registry = Registry()
    sender = None
    handlers = list(handlers or [])
    if store is None and (rules or (journal and handlers)):
        raise TypeError("build_registry: rules and the change journal need the store")
    if rules:
        from amohook.actions import ActionSender
        from amohook.amocrm.client import client_for
        from amohook.rules import load_and_compile
        from amohook.rules.handler import RulesHandler

        assert store is not None  # checked above
        compiled = load_and_compile(str(rules))
        clients: dict = {}

        def client(sub: str):
            if sub not in clients:
                # One attempt: a 429 or a failure comes back to the sender, which reschedules the
                # batch instead of sleeping inside its lease.
                clients[sub] = client_for(store, sub, max_attempts=1)
            return clients[sub]

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


class StopEvent(threading.Event):
    """Set by SIGTERM/SIGINT (``signal`` names which), by ``Supervisor.stop`` or by a failing worker."""

    signal: str | None = None

    def log_signal(self, logger: logging.Logger) -> None:
        # Logged by the main loop, not in the handler: a handler that writes to stderr while the
        # main thread is writing there raises "reentrant call" inside the io buffer.
        if self.signal:
            logger.info("received %s; stopping (send it again to exit at once)", self.signal)


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
    ``reconcile_every`` and ``keep`` are seconds (None: off). Nothing starts until ``start``;
    invalid rules raise in the constructor.
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
        lease_seconds: float = 300.0,
        max_attempts: int = 10,
        batch_size: int = 10,
        poll_interval: float = 1.0,
        journal: bool | None = None,
        search_dir: str | None = None,
    ):
        self.store = store
        self.listen = listen
        self.reconcile_every = reconcile_every
        self.keep = keep
        self.registry, self.sender = build_registry(
            handlers,
            rules,
            store,
            journal=reconcile_every is not None if journal is None else journal,
            search_dir=search_dir,
        )
        prefix = "serve" if listen is not None else "worker"
        count = threads if len(self.registry) else 0  # nothing to run: events stay pending
        options: dict[str, Any] = (
            {} if listen is not None else {"batch_size": batch_size, "poll_interval": poll_interval}
        )
        self.workers = [
            Worker(
                store,
                self.registry,
                new_worker_id(f"{prefix}{i}"),
                lease_seconds=lease_seconds,
                max_attempts=max_attempts,
                **options,
            )
            for i in range(count)
        ]
        self.service: WebhookService | None = None
        self.errors: list[BaseException] = []
        self._stop = StopEvent()  # the workers' (worker mode) and the waiting loop's
        self._background = threading.Event()  # the sender's, the reconciler's and the pruner's
        self._threads: list[threading.Thread] = []
        self._sender_thread: threading.Thread | None = None
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

    def start(self) -> Supervisor:
        """Start everything in the background; returns at once. ``OSError``: cannot listen."""
        from amohook.webhooks.server import WebhookService

        if self.listen is not None:
            self.service = WebhookService(self.store, self.listen, workers=self.workers)
            self.service.start()
            self.store.close()  # the main thread's connection; every thread of the service opens its own
        else:
            for worker in self.workers:
                thread = threading.Thread(target=self._run, args=(worker,), name=worker.worker_id, daemon=True)
                thread.start()
                self._threads.append(thread)
        if self.workers:
            self._sender_thread = self._start_sender()
            if self.reconcile_every is not None:
                from amohook.recovery.reconcile import Reconciler

                self.reconciler = Reconciler(
                    self.store,
                    self.reconcile_every,
                    listening=self.listen is not None,
                    after_pass=self._after_pass(),
                )
                self.reconciler.start(self._background)
            elif self.stale is not None:
                log.warning(
                    "lead.stale rules are checked after each reconciliation pass: --reconcile is off, so they never"
                    " fire"
                )
        if self.keep is not None:
            from amohook.ops.retention import Pruner

            Pruner(self.store, self.keep).start(self._background)
        self._started = True
        return self

    def _run(self, worker: Worker) -> None:
        try:
            worker.run(self._stop)
        except BaseException as exc:  # raised again by stop() in the caller's thread
            self.errors.append(exc)
            self._stop.set()

    def _start_sender(self) -> threading.Thread | None:
        """The thread that sends recorded tasks in batches (only with rules)."""
        if self.sender is None:
            return None
        thread = threading.Thread(target=self.sender.run, args=(self._background,), name="amohook-actions", daemon=True)
        thread.start()
        return thread

    def wait(self, stop: threading.Event) -> None:
        """Block until ``stop`` is set (or, without a listener, until every worker has ended)."""
        if self.listen is not None:
            while not stop.wait(1.0):
                pass
            return
        while any(t.is_alive() for t in self._threads) and not stop.wait(0.1):
            pass

    def stop(self) -> None:
        """Stop within a few seconds: running handlers finish, claimed events are released, the
        sender's batch in flight usually completes. Raises a worker thread's error, if any."""
        if self.listen is not None:
            deadline = time.monotonic() + SERVE_STOP_SECONDS
            # A batch in flight usually finishes within the deadline; if not, its actions stay
            # `sending` and the next sender looks them up before sending anything again.
            self._background.set()
            if self.service is not None:
                self.service.stop(timeout=SERVE_STOP_SECONDS - 1.5)
            if self._sender_thread is not None:
                self._sender_thread.join(max(0.1, deadline - time.monotonic()))
        else:
            self._stop.set()
            deadline = time.monotonic() + WORKER_STOP_SECONDS
            for thread in self._threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            self._background.set()
            if self._sender_thread is not None:
                self._sender_thread.join(5.0)
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

            Reconciler(self.store, self.reconcile_every or 300.0, after_pass=self._after_pass()).run_once()
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
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.errors:
            raise self.errors[0]
        if self.sender is not None:
            self.sender.drain()  # send the tasks the events just recorded
        return sum(w.processed for w in self.workers)
