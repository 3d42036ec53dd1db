"""`amohook serve` (the webhook listener, with worker threads) and `amohook worker` (workers alone)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from amohook.cli.common import say, state
from amohook.cli.logs import Level
from amohook.settings import BATCH_SIZE, LEASE_SECONDS, MAX_ATTEMPTS, POLL_SECONDS, RECONCILE_EVERY, format_duration

HandlerOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--handler",
        help="A handler to run for every event, as package.module:function (called as fn(event, ctx)); repeatable. "
        "Looked up on PYTHONPATH, then in the current directory (only for this import).",
    ),
]
LeaseOpt = Annotated[
    float,
    typer.Option(
        "--lease",
        min=1.0,
        help="Seconds a claimed event stays reserved; renewed while its handler runs. "
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
        help="How often to read amoCRM's events log for changes no webhook brought: 30s, 5m, 1h or off. "
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
        "(at least 1d; `off` keeps everything).",
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


def reconcile_interval(option: str | None, has_work: bool) -> float | None:
    """Seconds between background reconciliation passes, or None (off)."""
    from amohook.settings import parse_duration

    if option is None:
        return RECONCILE_EVERY if has_work else None
    return parse_duration(option, option="--reconcile")


def keep_seconds(keep: str) -> float | None:
    """--keep as seconds (None: off), checked before anything starts."""
    from amohook.errors import ConfigError
    from amohook.ops.retention import MIN_KEEP
    from amohook.settings import parse_duration

    seconds = parse_duration(keep, option="--keep")
    if seconds is not None and seconds < MIN_KEEP:
        raise ConfigError(f"--keep '{keep}' is too short — keep at least 1d (amoCRM retries for ~95 minutes)")
    return seconds


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
    lease: LeaseOpt = LEASE_SECONDS,
    max_attempts: MaxAttemptsOpt = MAX_ATTEMPTS,
    max_body: Annotated[
        int, typer.Option("--max-body", min=1024, help="Largest body accepted, in bytes (larger: 413).")
    ] = 1024 * 1024,
    request_timeout: Annotated[
        float,
        typer.Option("--request-timeout", min=0.1, help="Seconds of silence after which a request is dropped (408)."),
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
    store = state(ctx).store()
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
        socket_timeout=request_timeout,
        read_deadline=read_deadline,
        status_password=status_password,
    )
    interval = reconcile_interval(reconcile, bool(handler or rules))
    runner = Supervisor(
        store,
        rules=rules,
        handlers=handler or [],
        threads=workers,
        listen=config,
        reconcile_every=interval,
        keep=keep_seconds(keep),
        lease_seconds=lease,
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
    say(f"listening on {url}")  # on stdout as well: scripts and tests wait for this line
    log.info("listening on %s", url)
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
        "every " + _seconds(interval) if runner.reconciling else "off",
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
    lease: LeaseOpt = LEASE_SECONDS,
    max_attempts: MaxAttemptsOpt = MAX_ATTEMPTS,
    batch: Annotated[int, typer.Option("--batch", min=1, max=500, help="Events claimed at a time.")] = BATCH_SIZE,
    threads: Annotated[int, typer.Option("--threads", min=1, max=64, help="Worker threads in this process.")] = 1,
    poll: Annotated[
        float, typer.Option("--poll", min=0.05, help="Seconds between looks at an empty queue.")
    ] = POLL_SECONDS,
    once: Annotated[bool, typer.Option("--once", help="Process what is due now, then exit.")] = False,
    log_level: LogLevelOpt = Level.info,
    library_log_level: LibraryLogLevelOpt = Level.warning,
):
    """Process queued events with the given handlers; run several, on several machines, on one MySQL/PostgreSQL."""
    import os

    from amohook.errors import ConfigError
    from amohook.runtime.supervisor import Supervisor, stop_on_signals
    from amohook.settings import ENV_WEBHOOK_SECRET, secret_from

    _setup_logging(log_level, library_log_level, secrets=tuple(filter(None, [secret_from(None, ENV_WEBHOOK_SECRET)])))
    log = logging.getLogger("amohook.worker")
    store = state(ctx).store()
    interval = reconcile_interval(reconcile, bool(handler or rules))
    runner = Supervisor(
        store,
        rules=rules,
        handlers=handler or [],
        threads=threads,
        reconcile_every=interval,
        keep=keep_seconds(keep),
        lease_seconds=lease,
        max_attempts=max_attempts,
        batch_size=batch,
        poll_interval=poll,
        search_dir=os.getcwd(),
    )
    if not len(runner.registry):
        raise ConfigError("nothing to run — give --rules FILE and/or --handler package.module:function")
    stop = stop_on_signals()
    if once:
        processed = runner.run_once(stop, reconcile=interval is not None and reconcile is not None)
        stop.log_signal(log)
        say(f"processed {processed} event(s)")
        return
    runner.start()
    started = (
        f"worker started: {threads} thread(s), handlers: {', '.join(runner.registry.names())}; "
        f"reconciliation: {'every ' + _seconds(interval) if runner.reconciling else 'off'}"
    )
    say(started)  # on stdout as well, like `serve`'s "listening on": scripts wait for it
    log.info("%s", started)
    runner.wait(stop)
    stop.log_signal(log)
    runner.stop()
    log.info("stopped")


def _seconds(interval: float | None) -> str:
    return format_duration(interval) if interval else "off"


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("worker")(worker)
