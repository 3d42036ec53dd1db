"""`amohook serve` (the webhook listener, with worker threads) and `amohook worker` (workers alone)."""

from __future__ import annotations

import logging
import threading
from typing import Annotated, List, Optional

import typer

from amohook.cli.common import say, state
from amohook.cli.logs import Level

HandlerOpt = Annotated[
    Optional[List[str]],
    typer.Option(
        "--handler",
        help="A handler to run for every event, as package.module:function (called as fn(event, ctx)); repeatable. "
        "Looked up on PYTHONPATH, then in the current directory (only for this import).",
    ),
]
LeaseOpt = Annotated[
    float,
    typer.Option("--lease", min=1.0, help="Seconds a claimed event stays reserved; renewed while its handler runs. "
                 "A crashed worker's events are claimed again after it."),
]
MaxAttemptsOpt = Annotated[
    int, typer.Option("--max-attempts", min=1, help="Attempts before an event is marked dead (see `amohook events replay`).")
]
LogLevelOpt = Annotated[
    Level,
    typer.Option("--log-level", envvar="AMOHOOK_LOG_LEVEL", show_envvar=True, case_sensitive=False,
                 help="Level of amohook's own messages (to stderr; the journal under systemd). No level shows a "
                 "token or a secret."),
]
LibraryLogLevelOpt = Annotated[
    Level,
    typer.Option("--library-log-level", envvar="AMOHOOK_LIBRARY_LOG_LEVEL", show_envvar=True, case_sensitive=False,
                 help="Level of the libraries' own messages (peewee, urllib3, …). Their debug output shows every SQL "
                 "statement and request; token-shaped strings and the secrets are still masked."),
]
ReconcileOpt = Annotated[
    Optional[str],
    typer.Option("--reconcile", envvar="AMOHOOK_RECONCILE", show_envvar=True,
                 help="How often to read amoCRM's events log for changes no webhook brought: 30s, 5m, 1h or off. "
                 "Default: 5m when --rules or --handler is given, else off."),
]
KeepOpt = Annotated[
    str,
    typer.Option("--keep", envvar="AMOHOOK_KEEP", show_envvar=True,
                 help="Prune done events, deliveries, attempts and finished actions older than this, every hour "
                 "(at least 1d; `off` keeps everything)."),
]
RulesOpt = Annotated[
    Optional[str],
    typer.Option("--rules", envvar="AMOHOOK_RULES", show_envvar=True,
                 help="Rules file (TOML) whose tasks the workers create; checked at start (see `amohook rules check`)."),
]


def _setup_logging(level: Level, library_level: Level, secrets: tuple[str, ...] = ()) -> None:
    """--log-level sets amohook's own loggers only. Libraries stay at WARNING unless
    --library-log-level says otherwise: peewee's debug logger prints every statement with its
    parameters — the tokens a refresh writes among them — and urllib3's prints request lines. The
    formatter is a second guard either way."""
    from amohook.cli.logs import setup_logging

    setup_logging(level.value, library_level.value, secrets)


def build_registry(handlers: Optional[List[str]], rules: Optional[str] = None, store=None, *, journal: bool = False):
    """The handler registry for these options, and the task sender when there are rules.

    Invalid rules raise here, so `serve` and `worker` refuse to start with them.
    """
    import os

    from amohook.worker import Registry, load_handler

    registry = Registry()
    sender = None
    if rules:
        from amohook.actions import ActionSender
        from amohook.amocrm.client import client_for
        from amohook.rules import load_and_compile
        from amohook.rules_handler import RulesHandler

        compiled = load_and_compile(rules)
        clients: dict = {}

        def client(sub: str):
            if sub not in clients:
                # One attempt: a 429 or a failure comes back to the sender, which reschedules the
                # batch instead of sleeping inside its lease.
                clients[sub] = client_for(store, sub, max_attempts=1)
            return clients[sub]

        import logging

        logger = logging.getLogger("amohook.actions")
        sender = ActionSender(store, client, log=logger.warning)
        registry.register("rules", RulesHandler(compiled, store, on_recorded=lambda n: sender.wakeup.set()))
    elif journal and handlers:
        from amohook.changes import ChangeJournal

        registry.register("amohook.changes", ChangeJournal(store))
    for spec in handlers or []:
        # Handlers may live beside the config, but the working directory is searched only for
        # them, only while importing them, and last: a stray tomllib.py there is never imported.
        registry.register(spec, load_handler(spec, search_dir=os.getcwd()))
    return registry, sender


def reconcile_interval(option: Optional[str], has_work: bool) -> Optional[float]:
    """Seconds between background reconciliation passes, or None (off)."""
    from amohook.settings import parse_duration

    if option is None:
        return 300.0 if has_work else None
    return parse_duration(option, option="--reconcile")


def keep_seconds(keep: str) -> Optional[float]:
    """--keep as seconds (None: off), checked before anything starts."""
    from amohook.errors import ConfigError
    from amohook.retention import MIN_KEEP
    from amohook.settings import parse_duration

    seconds = parse_duration(keep, option="--keep")
    if seconds is not None and seconds < MIN_KEEP:
        raise ConfigError(f"--keep '{keep}' is too short — keep at least 1d (amoCRM retries for ~95 minutes)")
    return seconds


def _start_pruner(store, seconds: Optional[float], stop: threading.Event):
    if seconds is None:
        return None
    from amohook.retention import Pruner

    return Pruner(store, seconds).start(stop)


def _start_reconciler(store, interval: Optional[float], stop: threading.Event, wake=None):
    if interval is None:
        return None
    from amohook.reconcile import Reconciler

    reconciler = Reconciler(store, interval, on_queued=wake)
    reconciler.start(stop)
    return reconciler


def _start_sender(sender, stop: threading.Event):
    """The thread that sends recorded tasks in batches (only with --rules)."""
    if sender is None:
        return None
    thread = threading.Thread(target=sender.run, args=(stop,), name="amohook-actions", daemon=True)
    thread.start()
    return thread


class _Stop(threading.Event):
    """Set by SIGTERM/SIGINT (``signal`` names which) or by a failing worker thread."""

    signal: Optional[str] = None

    def log_signal(self, log: logging.Logger) -> None:
        # Logged by the main loop, not in the handler: a handler that writes to stderr while the
        # main thread is writing there raises "reentrant call" inside the io buffer.
        if self.signal:
            log.info("received %s; stopping (send it again to exit at once)", self.signal)


def _stop_on_signals() -> _Stop:
    """SIGTERM/SIGINT set the returned event; a second one exits at once."""
    import os
    import signal

    stop = _Stop()

    def handler(signum, frame):
        if stop.is_set():
            os._exit(130)
        stop.signal = signal.Signals(signum).name
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", envvar="AMOHOOK_HOST", help="Address to listen on (put a TLS proxy in front).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", envvar="AMOHOOK_PORT", min=0, max=65535, help="Port; 0 picks a free one.")] = 8080,
    secret: Annotated[
        Optional[str],
        typer.Option(
            "--secret",
            envvar="AMOHOOK_WEBHOOK_SECRET",
            show_envvar=True,
            help="The webhook secret (the URL is /webhook/SECRET), at least 16 characters. Prefer the "
            "environment variable: command lines are visible in `ps`.",
        ),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Worker threads processing events in this process.")] = 1,
    handler: HandlerOpt = None,
    rules: RulesOpt = None,
    reconcile: ReconcileOpt = None,
    keep: KeepOpt = "30d",
    lease: LeaseOpt = 300.0,
    max_attempts: MaxAttemptsOpt = 10,
    max_body: Annotated[int, typer.Option("--max-body", min=1024, help="Largest body accepted, in bytes (larger: 413).")] = 1024 * 1024,
    request_timeout: Annotated[
        float, typer.Option("--request-timeout", min=0.1, help="Seconds of silence after which a request is dropped (408).")
    ] = 10.0,
    read_deadline: Annotated[
        float, typer.Option("--read-deadline", min=0.1, help="Seconds in which a whole request must arrive (408).")
    ] = 30.0,
    log_level: LogLevelOpt = Level.info,
    library_log_level: LibraryLogLevelOpt = Level.warning,
):
    """Receive amoCRM webhooks: store each one durably, then answer 200; workers process them after.

    With AMOHOOK_STATUS_PASSWORD set (12 characters or more), GET /status (a page) and GET /metrics
    (Prometheus) answer with HTTP Basic auth, any user name; without it they are off (404).
    """
    from amohook.errors import ConfigError
    from amohook.settings import ENV_STATUS_PASSWORD, ENV_WEBHOOK_SECRET, secret_from
    from amohook.webhooks.server import ServerConfig, WebhookService, check_secret
    from amohook.webhooks.status_page import check_status_password
    from amohook.worker import Worker, new_worker_id

    config = ServerConfig(
        secret=check_secret(secret_from(secret, ENV_WEBHOOK_SECRET)),
        host=host,
        port=port,
        max_body=max_body,
        socket_timeout=request_timeout,
        read_deadline=read_deadline,
        status_password=check_status_password(secret_from(None, ENV_STATUS_PASSWORD)),
    )
    _setup_logging(log_level, library_log_level, secrets=tuple(filter(None, (config.secret, config.status_password))))
    log = logging.getLogger("amohook.serve")
    store = state(ctx).store()
    interval = reconcile_interval(reconcile, bool(handler or rules))
    keep_s = keep_seconds(keep)
    registry, sender = build_registry(handler, rules, store, journal=interval is not None)
    worker_list = []
    if workers and not len(registry):
        log.warning("no handlers given: webhooks are stored and stay pending until `amohook worker --handler …` "
                    "(or `serve --handler …`) processes them")
    elif workers:
        worker_list = [
            Worker(store, registry, new_worker_id(f"serve{i}"), lease_seconds=lease, max_attempts=max_attempts)
            for i in range(workers)
        ]
    service = WebhookService(store, config, workers=worker_list)
    stop = _stop_on_signals()  # before starting: a SIGTERM during start-up still stops cleanly
    try:
        service.start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc} — pick another --host/--port") from None
    store.close()  # the main thread's connection; every thread of the service opens its own
    sender_stop = threading.Event()
    sender_thread = _start_sender(sender, sender_stop) if worker_list else None
    _start_reconciler(store, interval if worker_list else None, sender_stop)
    _start_pruner(store, keep_s, sender_stop)
    say(f"listening on {service.url}")  # on stdout as well: scripts and tests wait for this line
    log.info("listening on %s", service.url)
    log.info("webhook URL: %s/webhook/<secret>; health: %s/healthz; OAuth redirect: %s/oauth/callback; "
             "%d worker thread(s); reconciliation: %s", service.url, service.url, service.url, len(worker_list),
             "every " + _seconds(interval) if interval and worker_list else "off")
    log.info("status page and metrics: %s", f"{service.url}/status and {service.url}/metrics (HTTP Basic auth)"
             if config.status_password else f"off (set {ENV_STATUS_PASSWORD} to turn them on)")
    while not stop.wait(1.0):
        pass
    stop.log_signal(log)
    import time

    deadline = time.monotonic() + 9.0
    # A batch in flight usually finishes within the deadline; if not, its actions stay `sending`
    # and the next sender looks them up before sending anything again.
    sender_stop.set()
    service.stop(timeout=7.5)
    if sender_thread is not None:
        sender_thread.join(max(0.1, deadline - time.monotonic()))
    log.info("stopped")


def worker(
    ctx: typer.Context,
    handler: HandlerOpt = None,
    rules: RulesOpt = None,
    reconcile: ReconcileOpt = None,
    keep: KeepOpt = "30d",
    lease: LeaseOpt = 300.0,
    max_attempts: MaxAttemptsOpt = 10,
    batch: Annotated[int, typer.Option("--batch", min=1, max=500, help="Events claimed at a time.")] = 10,
    threads: Annotated[int, typer.Option("--threads", min=1, max=64, help="Worker threads in this process.")] = 1,
    poll: Annotated[float, typer.Option("--poll", min=0.05, help="Seconds between looks at an empty queue.")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Process what is due now, then exit.")] = False,
    log_level: LogLevelOpt = Level.info,
    library_log_level: LibraryLogLevelOpt = Level.warning,
):
    """Process queued events with the given handlers; run several, on several machines, on one MySQL/PostgreSQL."""
    from amohook.errors import ConfigError
    from amohook.worker import Worker, new_worker_id

    from amohook.settings import ENV_WEBHOOK_SECRET, secret_from

    _setup_logging(log_level, library_log_level, secrets=tuple(filter(None, [secret_from(None, ENV_WEBHOOK_SECRET)])))
    log = logging.getLogger("amohook.worker")
    store = state(ctx).store()
    interval = reconcile_interval(reconcile, bool(handler or rules))
    keep_s = keep_seconds(keep)
    registry, sender = build_registry(handler, rules, store, journal=interval is not None)
    if not len(registry):
        raise ConfigError("nothing to run — give --rules FILE and/or --handler package.module:function")
    stop = _stop_on_signals()
    sender_stop = threading.Event()
    sender_thread = None if once else _start_sender(sender, sender_stop)
    if once and interval is not None and reconcile is not None:
        from amohook.reconcile import Reconciler

        Reconciler(store, interval).run_once()  # what the log has that no webhook brought, then drain
    reconciler = None if once else _start_reconciler(store, interval, sender_stop)
    if not once:
        _start_pruner(store, keep_s, sender_stop)
    pool = [
        Worker(store, registry, new_worker_id(f"worker{i}"), lease_seconds=lease, max_attempts=max_attempts,
               batch_size=batch, poll_interval=poll)
        for i in range(threads)
    ]
    errors: list[BaseException] = []

    def run(w: Worker) -> None:
        try:
            if once:
                w.drain(stop)
            else:
                w.run(stop)
        except BaseException as exc:  # surfaced by the main thread through the CLI's error funnel
            errors.append(exc)
            stop.set()

    running = [threading.Thread(target=run, args=(w,), name=w.worker_id, daemon=True) for w in pool]
    for thread in running:
        thread.start()
    if not once:
        started = (f"worker started: {threads} thread(s), handlers: {', '.join(registry.names())}; reconciliation: "
                   f"{'every ' + _seconds(interval) if reconciler else 'off'}")
        say(started)  # on stdout as well, like `serve`'s "listening on": scripts wait for it
        log.info("%s", started)
    while any(t.is_alive() for t in running) and not stop.wait(0.1):
        pass
    stop.log_signal(log)
    import time

    deadline = time.monotonic() + 8.0
    for thread in running:
        thread.join(max(0.0, deadline - time.monotonic()))
    sender_stop.set()
    if sender_thread is not None:
        sender_thread.join(5.0)
    if errors:
        raise errors[0]
    if once and sender is not None:
        sender.drain()  # send the tasks the events just recorded
    if once:
        say(f"processed {sum(w.processed for w in pool)} event(s)")
    else:
        log.info("stopped")


def _seconds(interval: Optional[float]) -> str:
    if not interval:
        return "off"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if interval >= size and interval % size == 0:
            return f"{int(interval // size)}{unit}"
    return f"{interval:g}s"


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("worker")(worker)
