"""The worker: claim due events, run the handlers, record the attempt, retry or give up.

Processing is at least once: a worker that dies mid-handler leaves its lease to expire and the
event runs again elsewhere, so handlers must be idempotent. Handlers are plain callables
``fn(event, ctx)``; the return value is ignored, raising is failure:

* ``RateLimited`` — retried after its ``retry_after`` (amoCRM's 429);
* ``PermanentError`` — dead at once (retrying cannot help: bad data, a rule that cannot apply);
* anything else — retried with exponential backoff and jitter, dead after ``max_attempts``.

The delays are ``amohook.retry.decide``'s, the same decision the action sender takes.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from amohook import inbox
from amohook.errors import AmohookError, ConfigError, PermanentError, describe
from amohook.inbox import InboxEvent
from amohook.retry import EVENTS, Backoff, RetryPolicy, decide
from amohook.runtime.loop import on_stop
from amohook.settings import BATCH_SIZE, LEASE_SECONDS, MAX_ATTEMPTS, POLL_SECONDS

if TYPE_CHECKING:
    from amohook.store import Store

__all__ = [
    "HandlerContext",
    "InboxEvent",
    "PermanentError",
    "Registry",
    "Worker",
    "load_handler",
]

log = logging.getLogger("amohook.worker")

Handler = Callable[[InboxEvent, "HandlerContext"], Any]


# --- the attempt log ---------------------------------------------------------------------------


def error_excerpt(name: str, error: BaseException, limit: int = 1000) -> str:
    """One line for the attempt log: handler, type, message and where it was raised (no locals)."""
    message = error.message if isinstance(error, AmohookError) else str(error)
    message = " ".join(message.split())
    where = ""
    tb = traceback.extract_tb(error.__traceback__)
    if tb:
        frame = tb[-1]
        where = f" (at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name})"
    text = f"{name}: {type(error).__name__}: {message}{where}"
    return text[:limit]


# --- handlers ----------------------------------------------------------------------------------


class Registry:
    """Named handlers, run in registration order for every event."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, name: str, fn: Handler) -> Handler:
        if not callable(fn):
            raise TypeError(f"handler {name!r} is not callable")
        if name in self._handlers:
            raise ValueError(f"a handler named {name!r} is already registered")
        self._handlers[name] = fn
        return fn

    def unregister(self, name: str) -> None:
        self._handlers.pop(name, None)

    def items(self) -> list[tuple[str, Handler]]:
        return list(self._handlers.items())

    def names(self) -> list[str]:
        return list(self._handlers)

    def __len__(self) -> int:
        return len(self._handlers)

    def __contains__(self, name: object) -> bool:
        return name in self._handlers


def load_handler(spec: str, search_dir: str | None = None) -> Handler:
    """Import ``package.module:function`` (the function may be a dotted attribute path).

    ``search_dir`` (the CLI passes the working directory) is consulted for this import only, and
    after every other entry of ``sys.path``: a file there can never shadow the standard library or
    an installed package, and nothing is imported from it unless a handler was asked for.
    Whatever the module does on import — even ``sys.exit()`` — becomes a ``ConfigError`` naming it.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"handler '{spec}' must look like package.module:function")
    added = search_dir is not None and search_dir not in sys.path
    if added and search_dir is not None:
        sys.path.append(search_dir)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import handler module '{module_name}': {exc} — is it on PYTHONPATH?") from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: a module must not end amohook with its own exit code
        raise ConfigError(f"handler '{spec}': importing module '{module_name}' failed: {describe(exc)}") from None
    finally:
        if added and search_dir in sys.path:
            sys.path.remove(search_dir)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module '{module_name}' has no '{attr}' (handler '{spec}')") from None
    if not callable(obj):
        raise ConfigError(f"handler '{spec}' is not callable")
    return obj


class HandlerContext:
    """What a handler may use besides the event: the store, a logger, and the amoCRM client."""

    def __init__(self, worker: Worker, event: InboxEvent):
        self._worker = worker
        self.event = event
        self.store = worker.store
        self.worker_id = worker.worker_id
        self.logger = worker.log

    def client(self, subdomain: str | None = None):
        """The API client for ``subdomain`` (default: the event's account), made on first use."""
        sub = subdomain or self.event.account
        if not sub:
            raise PermanentError(f"event {self.event.id} names no account subdomain; pass subdomain= to ctx.client()")
        return self._worker.client(sub)


# --- the worker --------------------------------------------------------------------------------


def new_worker_id(label: str = "w") -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{label}:{uuid.uuid4().hex[:6]}"


class Worker:
    """Claims batches of due events and runs them through the registry.

    One ``Worker`` is one thread of work (its store connection is per thread); run several for
    parallelism. ``run_once`` serves library code and tests; ``run`` loops until ``stop_event``.
    """

    def __init__(
        self,
        store: Store,
        registry: Registry,
        worker_id: str | None = None,
        *,
        lease_seconds: float = LEASE_SECONDS,
        max_attempts: int = MAX_ATTEMPTS,
        batch_size: int = BATCH_SIZE,
        poll_interval: float = POLL_SECONDS,
        policy: RetryPolicy | None = None,
        max_handler_seconds: float = 3600.0,
        client_factory: Callable[[Any, str], Any] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        logger: logging.Logger | None = None,
    ):
        if lease_seconds <= 0:
            raise ConfigError("the lease must be longer than 0 seconds")
        if max_attempts < 1:
            raise ConfigError("--max-attempts must be at least 1")
        self.store = store
        self.registry = registry
        self.worker_id = worker_id or new_worker_id()
        self.lease_seconds = lease_seconds
        self.policy = replace(policy or EVENTS, max_attempts=max_attempts)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.max_handler_seconds = max_handler_seconds
        self.client_factory = client_factory
        self.clock = clock
        self.sleep = sleep
        self.rand = rand
        self.log = logger or log
        self._clients: dict[str, Any] = {}
        self._wake = threading.Event()
        self._stop: threading.Event | None = None
        self._held: list[int] = []
        self._held_lock = threading.Lock()
        self._current_since: float | None = None
        self._heartbeat: threading.Thread | None = None
        self._closing = threading.Event()
        self.processed = 0
        self._outcomes: dict[str, int] = {}  # event attempts by outcome (ok, retry, dead, lost)
        self._outcomes_lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.worker_id

    def health(self) -> dict[str, Any]:
        """Events this worker ran since it started, by outcome; how long the current one has run."""
        with self._outcomes_lock:
            outcomes = dict(self._outcomes)
        since = self._current_since
        return {
            "processed": self.processed,
            "outcomes": outcomes,
            "running_for": None if since is None else round(time.monotonic() - since, 1),
        }

    # -- public -------------------------------------------------------------------------------
    def run_once(self) -> int:
        """Claim one batch and process it; returns how many events were run (0: nothing due)."""
        if not len(self.registry):
            # Claiming with nothing to run would mark events done (or dead) unprocessed.
            raise ConfigError("no handlers are registered — give at least one --handler package.module:function")
        self.store.relax_durability()
        events = inbox.claim(
            self.store,
            self.worker_id,
            limit=self.batch_size,
            lease_seconds=self.lease_seconds,
            max_attempts=self.policy.max_attempts,
            now=self.clock(),
        )
        if not events:
            return 0
        self._ensure_heartbeat()
        with self._held_lock:
            self._held = [e.id for e in events]
        ran = 0
        try:
            for position, event in enumerate(events):
                if self._stop is not None and self._stop.is_set():
                    left = [e.id for e in events[position:]]
                    released = inbox.release(self.store, left, self.worker_id, now=self.clock())
                    self.log.info("stopping: released %d claimed events that had not started", released)
                    break
                outcome = self._process(event)
                with self._outcomes_lock:
                    self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1
                ran += 1
                with self._held_lock:
                    self._held = [e.id for e in events[position + 1 :]]
        finally:
            with self._held_lock:
                self._held = []
        self.processed += ran
        return ran

    def run(self, stop_event: threading.Event) -> None:
        """Work until ``stop_event`` is set; the event being run finishes, the rest is released."""
        self._stop = stop_event
        on_stop(stop_event, self._wake.set)  # asleep until the next poll: hear of the stop at once
        # The store is down: look again from the poll interval up to 30 s, without jitter (the
        # waits are logged as they are).
        store_down = Backoff(base=self.poll_interval, cap=max(30.0, self.poll_interval), jitter=0.0)
        failures = 0
        try:
            while not stop_event.is_set():
                try:
                    ran = self.run_once()
                    failures = 0
                except ConfigError:
                    raise
                except Exception as exc:  # the store is down: keep trying, do not die
                    failures += 1
                    wait = store_down.delay(failures)
                    self.log.error("worker %s: %s; retrying in %.0f s", self.worker_id, describe(exc), wait)
                    self.store.close_quietly()
                    ran = 0
                    stop_event.wait(wait)
                    continue
                if ran == 0:
                    self._wake.wait(self.poll_interval)
                    self._wake.clear()
        finally:
            self.close()

    def drain(self, stop_event: threading.Event | None = None) -> int:
        """Run until nothing is due (``amohook worker --once``); returns how many events ran."""
        if stop_event is not None:
            self._stop = stop_event
        total = 0
        try:
            while True:
                if self._stop is not None and self._stop.is_set():
                    break
                ran = self.run_once()
                if ran == 0:
                    break
                total += ran
        finally:
            self.close()
        return total

    def wake(self) -> None:
        """New events were stored: look now instead of at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
        self._wake.set()

    def close(self) -> None:
        self._closing.set()
        self.store.close_quietly()

    def client(self, subdomain: str):
        client = self._clients.get(subdomain)
        if client is None:
            if self.client_factory is not None:
                client = self.client_factory(self.store, subdomain)
            else:
                from amohook.amocrm.client import client_for

                client = client_for(self.store, subdomain)
            self._clients[subdomain] = client
        return client

    # -- one event ----------------------------------------------------------------------------
    def _process(self, event: InboxEvent) -> str:
        started = self.clock()
        self._current_since = time.monotonic()
        error: BaseException | None = None
        failed_in = ""
        ctx = HandlerContext(self, event)
        try:
            for name, fn in self.registry.items():
                try:
                    fn(event, ctx)
                except Exception as exc:
                    error, failed_in = exc, name
                    break
        finally:
            self._current_since = None
        now = self.clock()
        if error is None:
            if inbox.complete(self.store, event.id, self.worker_id, started_at=started, now=now):
                return "ok"
            self.log.warning("event %s finished after its lease was lost; another worker may run it again", event.id)
            return "lost"
        attempt = event.attempts + 1
        delay = decide(error, attempt, self.policy, self.rand()).wait
        excerpt = error_excerpt(failed_in, error)
        if isinstance(error, AmohookError):
            self.log.warning("event %s attempt %d failed: %s", event.id, attempt, excerpt)
        else:  # a bug in a handler: the stack goes to the log, an excerpt to the store
            self.log.warning("event %s attempt %d failed: %s", event.id, attempt, excerpt, exc_info=error)
        retry_at = None if delay is None else now + delay
        won = inbox.fail(
            self.store, event.id, self.worker_id, error=excerpt, retry_at=retry_at, started_at=started, now=now
        )
        if not won:
            return "lost"
        if delay is None:
            self.log.error("event %s is dead after %d attempts: %s", event.id, attempt, excerpt)
            return "dead"
        return "retry"

    # -- lease renewal ------------------------------------------------------------------------
    def _ensure_heartbeat(self) -> None:
        if self._heartbeat is None or not self._heartbeat.is_alive():
            self._closing.clear()
            self._heartbeat = threading.Thread(target=self._beat, name=f"amohook-lease-{self.worker_id}", daemon=True)
            self._heartbeat.start()

    def _beat(self) -> None:
        """Renew the lease on what this worker holds every third of the lease.

        A handler stuck longer than ``max_handler_seconds`` stops being renewed: its lease runs
        out and another worker takes the event; the stuck one's late result is then refused.
        """
        interval = max(0.05, self.lease_seconds / 3)
        try:
            while not self._closing.wait(interval):
                since = self._current_since
                if since is not None and time.monotonic() - since > self.max_handler_seconds:
                    continue
                with self._held_lock:
                    held = list(self._held)
                if not held:
                    continue
                try:
                    inbox.renew(self.store, held, self.worker_id, lease_seconds=self.lease_seconds, now=self.clock())
                except Exception as exc:
                    self.log.warning("renewing leases failed: %s", describe(exc))
                    self.store.close_quietly()
        finally:
            self.store.close_quietly()
