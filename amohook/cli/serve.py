"""`amohook serve` (the webhook listener, with worker threads) and `amohook worker` (workers alone)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from amohook.cli.common import duration, say, state
from amohook.cli.logs import Level, announce
from amohook.durations import format_duration
from amohook.settings import BATCH_SIZE, MAX_ATTEMPTS, RECONCILE_EVERY

HandlerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--handler",
        help="A handler to run for every event, as package.module:function (called as fn(event, ctx)); repeatable. "
        "Looked up on PYTHONPATH, then in the current directory (only for this import).",
    ),
]
LeaseOpt = Annotated[
    str,
    typer.Option(
        "--lease",
        help="How long a claimed event stays reserved (1s to 1d); renewed while its handler runs. "
        "A crashed worker's events are claimed again after it.",
    ),
]
MaxAttemptsOpt = Annotated[
    int,
    typer.Option(
        "--max-attempts", min=1, help="Attempts before an event is marked dead (see `amohook events replay`)."
    ),
]
LogLevelOpt = Annotated[
    Level,
    typer.Option(
        "--log-level",
        envvar="AMOHOOK_LOG_LEVEL",
        show_envvar=True,
        case_sensitive=False,
        help="Level of amohook's own messages (to stderr; the journal under systemd). No level shows a "
        "token or a secret.",
    ),
]
LibraryLogLevelOpt = Annotated[
    Level,
    typer.Option(
        "--library-log-level",
        envvar="AMOHOOK_LIBRARY_LOG_LEVEL",
        show_envvar=True,
        case_sensitive=False,
        help="Level of the libraries' own messages (peewee, urllib3, …). Their debug output shows every SQL "
        "statement and request; token-shaped strings and the secrets are still masked.",
    ),
]
ReconcileOpt = Annotated[
    str | None,
    typer.Option(
        "--reconcile",
        envvar="AMOHOOK_RECONCILE",
        show_envvar=True,
        help="How often to read amoCRM's events log for changes no webhook brought: 30s, 5m, 1h (1s to 366d) or off. "
        "Default: 5m when --rules or --handler is given, else off.",
    ),
]
KeepOpt = Annotated[
    str,
    typer.Option(
        "--keep",
        envvar="AMOHOOK_KEEP",
        show_envvar=True,
        help="Prune done events, deliveries, attempts and finished actions older than this, every hour "
        "(1d to 366d; `off` keeps everything).",
    ),
]
RulesOpt = Annotated[
    str | None,
    typer.Option(
        "--rules",
        envvar="AMOHOOK_RULES",
        show_envvar=True,
        help="Rules file (TOML) whose tasks the workers create; checked at start (see `amohook rules check`).",
    ),
]


def _setup_logging(level: Level, library_level: Level, secrets: tuple[str, ...] = ()) -> None:
    """--log-level sets amohook's own loggers only. Libraries stay at WARNING unless
    --library-log-level says otherwise: peewee's debug logger prints every statement with its
    parameters — the tokens a refresh writes among them — and urllib3's prints request lines. The
    formatter is a second guard either way."""
    from amohook.cli.logs import setup_logging

    setup_logging(level.value, library_level.value, secrets)


# The bounds of the duration options below; every one is read by amohook.durations.
MAX_LEASE = 86400.0
MIN_TIMEOUT, MAX_TIMEOUT = 0.1, 3600.0
MIN_POLL, MAX_POLL = 0.05, 3600.0


def reconcile_interval(ctx: typer.Context, has_work: bool) -> float | None:
    """Seconds between background reconciliation passes, or None (off)."""
    if ctx.params["reconcile"] is None:
        return RECONCILE_EVERY if has_work else None
    return duration(ctx, "reconcile")


def keep_seconds(ctx: typer.Context) -> float | None:
    """--keep as seconds (None: off), checked before anything starts."""
    from amohook.ops.retention import MIN_KEEP, MIN_KEEP_WHY

    return duration(ctx, "keep", low=MIN_KEEP, why_low=MIN_KEEP_WHY)


def serve(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option("--host", envvar="AMOHOOK_HOST", help="Address to listen on (put a TLS proxy in front).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", envvar="AMOHOOK_PORT", min=0, max=65535, help="Port; 0 picks a free one.")
    ] = 8080,
    secret: Annotated[
        str | None,
        typer.Option(
            "--secret",
            envvar="AMOHOOK_WEBHOOK_SECRET",
            show_envvar=True,
            help="The webhook secret (the URL is /webhook/SECRET), at least 16 characters. Prefer the "
            "environment variable: command lines are visible in `ps`. Unset: a secret generated once and "
            "kept in the store (`amohook webhooks url` prints the URL).",
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="Worker threads processing events in this process.")
    ] = 1,
    handler: HandlerOpt = None,
    rules: RulesOpt = None,
    reconcile: ReconcileOpt = None,
    keep: KeepOpt = "30d",
    lease: LeaseOpt = "5m",
    max_attempts: MaxAttemptsOpt = MAX_ATTEMPTS,
    max_body: Annotated[
        int, typer.Option("--max-body", min=1024, help="Largest body accepted, in bytes (larger: 413).")
    ] = 1024 * 1024,
    request_timeout: Annotated[
        str,
        typer.Option("--request-timeout", help="Silence after which a request is dropped (408); 0.1s to 1h."),
    ] = "10s",
    read_deadline: Annotated[
        str, typer.Option("--read-deadline", help="Time in which a whole request must arrive (408); 0.1s to 1h.")
    ] = "30s",
    log_level: LogLevelOpt = Level.info,
    library_log_level: LibraryLogLevelOpt = Level.warning,
):
    """Receive amoCRM webhooks: store each one durably, then answer 200; workers process them after.

    With AMOHOOK_STATUS_PASSWORD set (12 characters or more), GET /status (a page) and GET /metrics
    (Prometheus) answer with HTTP Basic auth, any user name; without it they are off (404).
    """
    import os

    from amohook.errors import ConfigError
    from amohook.ops.status_page import check_status_password
    from amohook.runtime.supervisor import Supervisor, stop_on_signals
    from amohook.settings import ENV_STATUS_PASSWORD, ENV_WEBHOOK_SECRET, secret_from
    from amohook.webhooks.server import ServerConfig, check_secret

    explicit = secret_from(secret, ENV_WEBHOOK_SECRET)
    if explicit is not None:
        explicit = check_secret(explicit)
    status_password = check_status_password(secret_from(None, ENV_STATUS_PASSWORD))
    _setup_logging(log_level, library_log_level, secrets=tuple(filter(None, (explicit, status_password))))
    log = logging.getLogger("amohook.serve")
    store = state(ctx).store(create=True)  # its /oauth/callback completes `auth-url` on a new store
    webhook_secret = explicit
    if webhook_secret is None:
        # The quick start sets no secret: keep one in the store, where `webhooks url` finds it.
        from amohook.webhooks.secret import keep_secret

        webhook_secret = keep_secret(store)
        _setup_logging(log_level, library_log_level, secrets=tuple(filter(None, (webhook_secret, status_password))))
    config = ServerConfig(
        secret=webhook_secret,
        host=host,
        port=port,
        max_body=max_body,
        socket_timeout=duration(ctx, "request_timeout", low=MIN_TIMEOUT, high=MAX_TIMEOUT, off=False),
        read_deadline=duration(ctx, "read_deadline", low=MIN_TIMEOUT, high=MAX_TIMEOUT, off=False),
        status_password=status_password,
    )
    interval = reconcile_interval(ctx, bool(handler or rules))
    runner = Supervisor(
        store,
        rules=rules,
        handlers=handler or [],
        threads=workers,
        listen=config,
        reconcile_every=interval,
        keep=keep_seconds(ctx),
        lease_seconds=duration(ctx, "lease", high=MAX_LEASE, off=False),
        max_attempts=max_attempts,
        search_dir=os.getcwd(),
    )
    if workers and not len(runner.registry):
        log.warning(
            "no handlers given: webhooks are stored and stay pending until `amohook worker --handler …` "
            "(or `serve --handler …`) processes them"
        )
    stop = stop_on_signals()  # before starting: a SIGTERM during start-up still stops cleanly
    try:
        runner.start()
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} — pick another --host/--port"
        ) from None
    url = runner.url
    announce(log, f"listening on {url}")  # on stdout as well (not twice in the journal): scripts wait for it
    log.info(
        "webhook secret: %s",
        f"from {ENV_WEBHOOK_SECRET}"
        if explicit is not None
        else "the one kept in the store (`amohook webhooks url --public-url https://…` prints the URL for amoCRM)",
    )
    log.info(
        "webhook URL: %s/webhook/<secret>; health: %s/healthz; OAuth redirect: %s/oauth/callback; "
        "%d worker thread(s); reconciliation: %s",
        url,
        url,
        url,
        len(runner.workers),
        "every " + format_duration(interval) if runner.reconciling else "off",
    )
    log.info(
        "status page and metrics: %s",
        f"{url}/status and {url}/metrics (HTTP Basic auth)"
        if config.status_password
        else f"off (set {ENV_STATUS_PASSWORD} to turn them on)",
    )
    runner.wait(stop)
    stop.log_signal(log)
    runner.stop()
    log.info("stopped")


def worker(
    ctx: typer.Context,
    handler: HandlerOpt = None,
    rules: RulesOpt = None,
    reconcile: ReconcileOpt = None,
    keep: KeepOpt = "30d",
    lease: LeaseOpt = "5m",
    max_attempts: MaxAttemptsOpt = MAX_ATTEMPTS,
    batch: Annotated[int, typer.Option("--batch", min=1, max=500, help="Events claimed at a time.")] = BATCH_SIZE,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, max=64, help="Worker threads in this process [default: 1].")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, max=64, help="Deprecated: the old name of --workers (works, with a note)."),
    ] = None,
    poll: Annotated[str, typer.Option("--poll", help="Time between looks at an empty queue; 0.05s to 1h.")] = "1s",
    once: Annotated[bool, typer.Option("--once", help="Process what is due now, then exit.")] = False,
    log_level: LogLevelOpt = Level.info,
    library_log_level: LibraryLogLevelOpt = Level.warning,
):
    """Process queued events with the given handlers; run several, on several machines, on one MySQL/PostgreSQL."""
    import os

    from amohook.errors import ConfigError
    from amohook.runtime.supervisor import Supervisor, stop_on_signals
    from amohook.settings import ENV_WEBHOOK_SECRET, secret_from

    workers = _workers(workers, threads)
    _setup_logging(log_level, library_log_level, secrets=tuple(filter(None, [secret_from(None, ENV_WEBHOOK_SECRET)])))
    log = logging.getLogger("amohook.worker")
    store = state(ctx).store(create=True)  # started beside `serve` in any order, on one store
    interval = reconcile_interval(ctx, bool(handler or rules))
    runner = Supervisor(
        store,
        rules=rules,
        handlers=handler or [],
        threads=workers,
        reconcile_every=interval,
        keep=keep_seconds(ctx),
        lease_seconds=duration(ctx, "lease", high=MAX_LEASE, off=False),
        max_attempts=max_attempts,
        batch_size=batch,
        poll_interval=duration(ctx, "poll", low=MIN_POLL, high=MAX_POLL, off=False),
        search_dir=os.getcwd(),
    )
    if not len(runner.registry):
        raise ConfigError("nothing to run — give --rules FILE and/or --handler package.module:function")
    stop = stop_on_signals()
    if once:
        import time

        started_at = time.time()
        processed = runner.run_once(stop, reconcile=interval is not None and reconcile is not None)
        stop.log_signal(log)
        say(f"processed {processed} event(s)")
        _exit_if_dead(store, started_at)
        return
    runner.start()
    started = (
        f"worker started: {workers} worker thread(s), handlers: {', '.join(runner.registry.names())}; "
        f"reconciliation: {'every ' + format_duration(interval) if runner.reconciling else 'off'}"
    )
    announce(log, started)  # like `serve`'s "listening on"
    runner.wait(stop)
    stop.log_signal(log)
    runner.stop()
    log.info("stopped")


def _exit_if_dead(store, started_at: float) -> None:
    """`worker --once` (cron) exits 6, UNHEALTHY, when events went dead during its run: retrying
    will not help, a person has to look (and `events replay` them). Not 2: nothing was wrong with
    the command line, and the next run with the same one may be fine."""
    import sys

    from amohook.cli.logs import stderr_line
    from amohook.errors import ExitCode
    from amohook.inbox.queries import went_dead

    dead = went_dead(store, since=started_at)
    if dead:
        shown = ", ".join(str(i) for i in dead[:10]) + (", …" if len(dead) > 10 else "")
        line = (
            f"error: {len(dead)} event(s) went dead in this run ({shown}) — `amohook events show ID` says why, "
            "`amohook events replay ID` queues one again"
        )
        sys.stderr.write(stderr_line(line, logging.ERROR) + "\n")
        raise typer.Exit(int(ExitCode.UNHEALTHY))


def _workers(workers: int | None, threads: int | None) -> int:
    """`worker --workers`, or its old name `--threads`: one name for worker threads in `serve` and
    `worker` (`serve --threads` would read as the listener's own threads). The old name keeps
    working for the units and scripts that use it, with a one-line note on stderr."""
    if threads is None:
        return workers or 1
    from amohook.cli.common import warn

    if workers is not None and workers != threads:
        from amohook.errors import ConfigError

        raise ConfigError(f"--workers {workers} and --threads {threads} disagree — give --workers only")
    warn(f"warning: `worker --threads` is deprecated — write `--workers {threads}` (same meaning)")
    return threads


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("worker")(worker)
