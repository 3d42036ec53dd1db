"""`amohook doctor`: every check an admin would make by hand, each a line with its fix.

One call per account goes to amoCRM (``GET /api/v4/account`` through the usual client, which
refreshes an expired token the usual way); everything else is read from the store. Each check
stands alone, so one broken thing shows as one ✗: a failing database stops the rest (they would
all fail for the same reason), and a grant amoCRM refused is said once, by the token check.

Severities: ``ok``; ``warning`` (works now, needs a look soon); ``error`` (broken, a person must
act). Nothing here writes to the store except what the client does anyway (a token refresh, the
shared rate limit), and nothing shows a token, a secret or the database password.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING

from amohook.durations import format_duration
from amohook.errors import AccountBlocked, AmohookError, ConfigError, ReauthRequired, StoreError, first_line
from amohook.times import human_time

if TYPE_CHECKING:
    from amohook.store import Store

CLOCK_SKEW_WARN = 60.0  # seconds between our clock and amoCRM's Date header
PENDING_WARN = 600.0  # an event due this long and not taken: no worker running?
# Reconciliation runs every 5 minutes by default (serve/worker --reconcile); three missed passes
# plus the 10-minute overlap a pass re-reads is when "behind" stops being noise.
RECONCILE_LAG_WARN = 3 * 300.0 + 600.0
# A cursor further ahead of amoCRM's clock than this (the Date header's second, network delay, a
# pass that finished a moment ago) was set by a clock ahead of amoCRM's.
CURSOR_AHEAD_FAIL = 60.0
LONG_LIVED_WARN = 30 * 86400.0
DISK_ERROR_BYTES = 100 * 2**20
DISK_WARN_BYTES = 2**30
DISK_WARN_FRACTION = 0.10
SEVERITIES = ("ok", "warning", "error")


@dataclass
class Check:
    """One line of the report. ``fix`` says what a person should do (empty when all is well)."""

    name: str
    ok: bool
    severity: str  # ok, warning, error
    detail: str
    fix: str = ""
    account: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _ok(name: str, detail: str, account: str | None = None) -> Check:
    return Check(name, True, "ok", detail, "", account)


def _warn(name: str, detail: str, fix: str, account: str | None = None) -> Check:
    return Check(name, False, "warning", detail, fix, account)


def _error(name: str, detail: str, fix: str, account: str | None = None) -> Check:
    return Check(name, False, "error", detail, fix, account)


def worst(checks: list[Check]) -> str:
    """The overall state: the most severe of the checks."""
    return max((c.severity for c in checks), key=SEVERITIES.index, default="ok")


def _split_fix(message: str, default_fix: str) -> tuple[str, str]:
    """amohook's messages end in "— the fix"; split it off so the report shows it on its own line."""
    head, sep, tail = message.rpartition(" — ")
    return (head, tail) if sep and head else (message, default_fix)


def _one_line(exc: BaseException, url: str | None = None) -> str:
    """``first_line``, with the database URL's password masked (a driver may quote the URL)."""
    text = first_line(exc, 300)
    password = _password(url) if url else None
    return text.replace(password, "***") if password else text


def _password(url: str) -> str | None:
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


# -- the database ------------------------------------------------------------------------------
DB_FIX = "check --db-url / AMOHOOK_DB_URL and that the database server is up"


def open_store_checked(url: str):
    """Open the store without creating or migrating anything: (store, None) or (None, failing Check).

    A missing SQLite file is reported, not created: doctor must not make an empty store look fine.
    """
    from amohook.settings import redact_url
    from amohook.store import open_store

    try:
        return open_store(url, migrate_schema=False, create=False), None
    except (StoreError, ConfigError) as exc:
        head, fix = _split_fix(_one_line(exc, url), DB_FIX)
        return None, _error("database", f"{head} ({redact_url(url)})", fix)


def check_database(store: Store) -> Check:
    from amohook.settings import redact_url
    from amohook.store.migrations import LATEST, MISMATCH_FIX, current_version, read_schema, schema_problems, summarize

    where = str(store.sqlite_path) if store.is_sqlite else redact_url(store.url)
    try:
        store.ping()
        found = read_schema(store)
        version = current_version(store, found)
    except Exception as exc:  # peewee's and the drivers' errors: the database is not reachable
        return _error("database", f"cannot reach the database {where}: {_one_line(exc, store.url)}", DB_FIX)
    if version == 0 and "schema_version" not in found:
        return _error("database", f"no amohook store at {where}", "run `amohook init-auth` first")
    if version < LATEST:
        return _error(
            "database",
            f"{where} has schema version {version}; this amohook needs {LATEST}",
            "back the database up, then run any amohook command (e.g. `amohook status`): it "
            "brings the schema up to date",
        )
    if version > LATEST:
        return _error(
            "database",
            f"{where} has schema version {version}, newer than this amohook knows ({LATEST})",
            "upgrade amohook to the version that wrote it",
        )
    problems = schema_problems(store, found)
    if problems:
        return _error(
            "database",
            f"{where} says schema version {version} but lacks part of it: {summarize(problems)}",
            f"this amohook did not make that schema: {MISMATCH_FIX}",
        )
    for note in store.notes:  # a store file other users can read (it holds the tokens)
        head, _, fix = note.partition(" — run: ")
        return _warn("database", f"{head}; schema version {version} (current)", f"run: {fix}" if fix else "")
    return _ok("database", f"{where}, schema version {version} (current)")


# -- accounts: the token, the refresh token, the clock -------------------------------------------
def _default_client(store: Store, subdomain: str):
    from amohook.amocrm.client import client_for

    return client_for(store, subdomain, max_attempts=2)


def check_account(
    store: Store, account, now: float, client_factory: Callable, skews: dict[str, float] | None = None
) -> list[Check]:
    """The token works (one request), the refresh token's age, and our clock against amoCRM's
    (kept in ``skews`` by subdomain, for the reconciliation check)."""
    from amohook.store.models import Account

    sub = account.subdomain
    if not account.access_token:
        return [_error("token", "no tokens stored", f"run `amohook init-auth --subdomain {sub}`", sub)]
    before = account.access_token
    checks: list[Check] = []
    started = time.time()
    try:
        response = client_factory(store, sub).request("GET", "/api/v4/account")
    except ReauthRequired as exc:
        # The grant is gone: the refresh token's age and the clock say nothing more.
        head, fix = _split_fix(exc.message, f"run `amohook init-auth --subdomain {sub}`")
        return [_error("token", head, fix, sub)]
    except AccountBlocked as exc:
        head, fix = _split_fix(exc.message, "ask amoCRM support to unblock the account")
        checks.append(_error("token", head, fix, sub))
        response = None
    except AmohookError as exc:
        head, fix = _split_fix(exc.message, "check the network and amoCRM's status, then run `amohook doctor` again")
        checks.append(_error("token", f"GET /api/v4/account failed: {head}", fix, sub))
        response = None
    finished = time.time()
    account = Account.get_by_id(account.id)  # a refresh on 401 changed it
    refreshed = account.access_token != before
    if response is not None:
        checks.append(
            _ok(
                "token",
                f"works (GET /api/v4/account answered {response.status_code} in {finished - started:.2f} s)",
                sub,
            )
        )
    checks.append(check_refresh_token(account, now, refreshed=refreshed))
    if response is not None:
        clock = check_clock(response.headers.get("Date"), (started + finished) / 2, sub)
        if clock is not None:
            checks.append(clock)
        skew = date_skew(response.headers.get("Date"), (started + finished) / 2)
        if skews is not None and skew is not None:
            skews[sub] = skew
    return checks


def check_refresh_token(account, now: float, *, refreshed: bool = False) -> Check:
    from amohook.tokens import REFRESH_TOKEN_LIFETIME, REFRESH_TOKEN_WARN_AGE

    sub = account.subdomain
    name = "refresh token"
    reauth = f"run `amohook init-auth --subdomain {sub}` with a new authorization code"
    if account.long_lived:
        if account.expires_at is None:
            return _ok(name, "long-lived token without an expiry", sub)
        left = account.expires_at - now
        if left <= 0:
            return _error(
                name,
                f"the long-lived token expired on {human_time(account.expires_at)}",
                "generate a new one and run `amohook init-auth --long-lived-token`",
                sub,
            )
        if left < LONG_LIVED_WARN:
            return _warn(
                name,
                f"the long-lived token expires on {human_time(account.expires_at)} (in {format_duration(left)})",
                "generate a new one and run `amohook init-auth --long-lived-token`",
                sub,
            )
        return _ok(name, f"long-lived token, expires on {human_time(account.expires_at)}", sub)
    if not account.refresh_token:
        return _error(name, "no refresh token stored", reauth, sub)
    if account.last_refresh_error:
        error = account.last_refresh_error
        if "is no longer valid" in error:  # TokenRevoked's message (an unknown outcome's only says "may")
            return _error(name, "the last refresh was refused: the refresh token is revoked", reauth, sub)
        head, fix = _split_fix(error, f"run `amohook refresh-token --subdomain {sub}`")
        return _warn(name, f"the last refresh failed: {head}", fix, sub)
    age = now - account.issued_at if account.issued_at else None
    if age is not None and age >= REFRESH_TOKEN_LIFETIME:
        return _error(
            name,
            f"the refresh token is {format_duration(age)} old: amoCRM revokes it after 3 months unused",
            reauth,
            sub,
        )
    if age is not None and age >= REFRESH_TOKEN_WARN_AGE:
        left = format_duration(REFRESH_TOKEN_LIFETIME - age)
        return _warn(
            name,
            f"the refresh token is {format_duration(age)} old; amoCRM revokes it after 3 months "
            f"unused (about {left} left)",
            "check that `amohook refresh-token` runs (`systemctl list-timers 'amohook-*'`, or `crontab -l`) "
            "and what it prints",
            sub,
        )
    if refreshed:
        return _warn(
            name,
            "the access token no longer worked and doctor had to refresh it",
            "check that cron runs `amohook refresh-token` every 30 minutes",
            sub,
        )
    shown = "—" if age is None else format_duration(age)
    return _ok(name, f"issued {shown} ago (amoCRM revokes one unused for 3 months)", sub)


def date_skew(date_header: str | None, local: float) -> float | None:
    """This host's clock minus amoCRM's by its ``Date`` header; None without a readable one."""
    if not date_header:
        return None
    try:
        # Date has whole seconds: amoCRM's time was somewhere in [Date, Date + 1).
        remote = parsedate_to_datetime(date_header).timestamp() + 0.5
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return local - remote


def check_clock(date_header: str | None, local: float, account: str | None = None) -> Check | None:
    """Our clock against amoCRM's ``Date`` header; None when amoCRM sent none."""
    skew = date_skew(date_header, local)
    if skew is None:
        return None
    direction = "ahead of" if skew > 0 else "behind"
    detail = f"this machine's clock is {abs(skew):.0f} s {direction} amoCRM's"
    if abs(skew) > CLOCK_SKEW_WARN:
        return _warn(
            "clock",
            detail,
            "keep the clock synchronised: `timedatectl set-ntp true` (or run chrony/ntpd); "
            "task due times and reconciliation rely on it",
            account,
        )
    return _ok("clock", detail, account)


# -- the rules file -------------------------------------------------------------------------------
def check_rules(path: str) -> Check:
    from amohook.rules import RulesError, load_and_compile

    name = "rules"
    fix = (
        f"correct the file and run `amohook rules check --rules {path}`; a name amoCRM has but the "
        "store lacks needs `amohook sync-entities`"
    )
    try:
        compiled = load_and_compile(path)
    except RulesError as exc:
        count = len(exc.problems)
        return _error(name, f"{path}: {count} problem{'s' if count != 1 else ''}: " + "; ".join(exc.problems), fix)
    except ConfigError as exc:
        return _error(name, exc.message, fix)
    return _ok(name, f"{path}: {len(compiled)} rule{'s' if len(compiled) != 1 else ''} valid against the store")


# -- subscriptions and reconciliation --------------------------------------------------------------
def check_subscriptions(account: str, now: float) -> Check | None:
    """The watchdog's last finding, when amohook subscribed something or the watchdog found something."""
    from amohook.store.models import ReconcileState, Subscription

    ours = Subscription.select().where(Subscription.account == account).count()
    row = ReconcileState.get_or_none(ReconcileState.account == account)
    state = (row.subscription_state if row else None) or "unknown"
    note = (row.subscription_note if row else None) or ""
    checked = ""
    if row and row.subscription_checked_at:
        checked = f", checked {format_duration(max(0.0, now - row.subscription_checked_at))} ago"
    name = "webhook subscriptions"
    if state == "ok":
        return _ok(name, f"{ours} destination(s) subscribed by amohook, all on{checked}", account)
    if state == "re-enabled":
        return _ok(name, f"amoCRM had switched a destination off; the watchdog switched it on again{checked}", account)
    if state == "missing":
        return _error(
            name,
            f"a destination amohook subscribed is gone from amoCRM{': ' + note if note else ''}{checked}",
            f"`amohook webhooks list --subdomain {account}`, then `amohook webhooks subscribe --url URL` again",
            account,
        )
    if state == "disabled":
        return _error(
            name,
            f"amoCRM switched a destination off and it stays off{': ' + note if note else ''}{checked}",
            "make sure the listener answers from outside (its /healthz through the proxy), then "
            f"`amohook reconcile --subdomain {account}` switches it on again",
            account,
        )
    if not ours:
        return None  # amohook subscribed nothing: nothing to look after
    return _warn(
        name,
        f"amohook subscribed {ours} destination(s) but their state is not known"
        f"{': ' + note if note else ' (never checked)'}",
        f"run `amohook reconcile --subdomain {account}` (it checks them; an admin's token is needed)",
        account,
    )


def check_reconciliation(account: str, now: float, skew: float | None = None) -> Check | None:
    """How far behind the events log is read; None when reconciliation never ran for the account.

    ``skew``: this host's clock minus amoCRM's, from the ``Date`` header of the token check's
    request just now. The cursor is amoCRM's time: one ahead of amoCRM's clock means a pass read
    the log's future (a clock ahead of amoCRM's, before passes were bounded by amoCRM's clock, or
    another host's amohook) and what happened meanwhile was never read — blind, so it fails.
    """
    from amohook.store.models import ReconcileState

    row = ReconcileState.get_or_none(ReconcileState.account == account)
    if row is None or (row.last_pass_at is None and not row.last_error):
        return None
    name = "reconciliation"
    amo_now = now - (skew or 0.0)
    if skew is not None and row.cursor is not None and row.cursor > amo_now + CURSOR_AHEAD_FAIL:
        ahead = row.cursor - amo_now
        return _error(
            name,
            f"the events log was read up to {human_time(row.cursor)}, {format_duration(ahead)} ahead of amoCRM's "
            "clock (its Date header just now): a pass ran on a clock ahead of amoCRM's and read the log's future, "
            "so changes made in amoCRM since then were never read",
            f"set the clock right (`timedatectl set-ntp true`), then `amohook reconcile --subdomain {account} "
            f"--since {math.ceil((ahead + 3600) / 3600)}h` reads them (tasks amoCRM already holds are not made again)",
            account,
        )
    if row.last_error:
        return _warn(
            name,
            f"the last pass failed: {row.last_error}",
            f"run `amohook reconcile --subdomain {account}` to see whether it still fails",
            account,
        )
    # The cursor is amoCRM's time: the lag is measured on amoCRM's clock where it is known.
    seen = row.cursor if row.cursor is not None else row.last_pass_at  # not None: the early return above
    lag = max(0.0, (amo_now if row.cursor is not None else now) - seen) if seen is not None else 0.0
    if lag > RECONCILE_LAG_WARN:
        return _warn(
            name,
            f"the events log was last read {format_duration(max(0.0, lag))} ago",
            "is `amohook serve` or `amohook worker` running with reconciliation (`--reconcile 5m`)? "
            f"`amohook reconcile --subdomain {account}` catches up by hand",
            account,
        )
    return _ok(name, f"the events log was read {format_duration(max(0.0, lag))} ago", account)


# -- the queue ------------------------------------------------------------------------------------
def check_dead_events() -> Check:
    from amohook.store.models import Event

    dead = Event.select().where(Event.status == "dead")
    count = dead.count()
    if not count:
        return _ok("dead events", "none")
    last = dead.order_by(Event.updated_at.desc()).first()
    error = f"; the latest failed with: {last.last_error.splitlines()[0][:200]}" if last and last.last_error else ""
    return _error(
        "dead events",
        f"{count} event(s) gave up after their retries{error}",
        "`amohook events list --status dead` shows them; once the cause is fixed, "
        "`amohook events replay --dead` queues them again",
    )


def check_pending_events(now: float) -> Check:
    """Events due for longer than ``PENDING_WARN`` that no worker took (a retry's backoff is not a wait)."""
    from amohook.store.models import Event

    pending = Event.select().where(Event.status == "pending").count()
    stuck_since = now - PENDING_WARN
    stuck = (
        Event.select()
        .where(
            ((Event.status == "pending") & (Event.next_attempt_at <= stuck_since) & (Event.received_at <= stuck_since))
            | ((Event.status == "running") & (Event.lease_until < stuck_since))
        )
        .order_by(Event.received_at)
    )
    oldest = stuck.first()
    if oldest is not None:
        waited = now - max(oldest.received_at or 0, oldest.next_attempt_at or 0, (oldest.lease_until or 0))
        return _warn(
            "pending events",
            f"{pending} pending; the oldest has waited {format_duration(max(0.0, waited))} for a worker",
            "is a worker running? `systemctl status amohook`, or start `amohook worker` (`amohook serve` runs one too)",
        )
    return _ok("pending events", f"{pending} pending, none waiting longer than {format_duration(PENDING_WARN)}")


def check_failed_actions() -> Check:
    from amohook.store.models import Action, Event

    failed = list(
        Action.select(Action.event_id, Action.last_error)
        .where(Action.status == "failed")
        .order_by(Action.updated_at.desc())
        .limit(1000)
    )
    if not failed:
        return _ok("failed actions", "none")
    wanted = {a.event_id for a in failed if a.event_id is not None}
    # Only events still stored can be replayed (retention keeps an event with a failed action;
    # an older amohook did not, and `events replay` refuses a list with an id of no event).
    events = sorted(row.id for row in Event.select(Event.id).where(Event.id.in_(list(wanted)))) if wanted else []
    error = f"; the latest: {failed[0].last_error.splitlines()[0][:200]}" if failed[0].last_error else ""
    count = Action.select().where(Action.status == "failed").count()
    orphans = len(wanted) - len(events)
    gone = (
        f"{orphans} of their events were pruned already (by an older amohook), so those actions cannot be "
        "retried: they are deleted 90 days after they gave up"
    )
    if not events and orphans:  # nothing anyone can do: said, but not a failure for ever
        return _warn("failed actions", f"{count} rule action(s) gave up{error}", gone)
    # A command that runs as shown: at most ten ids, never an ellipsis among them.
    fix = (
        f"once the cause is fixed, replay their events: `amohook events replay {' '.join(map(str, events[:10]))}`"
        + (f" (the first 10 of {len(events)})" if len(events) > 10 else "")
        if events
        else "see `amohook events list` and replay their events"
    )
    if orphans:
        fix += f"; {gone}"
    return _error(
        "failed actions",
        f"{count} rule action(s) gave up{error}",
        fix + " (each is looked up in amoCRM before it is sent again)",
    )


# -- disk ---------------------------------------------------------------------------------------
def check_disk(path: Path, usage: Callable = shutil.disk_usage) -> Check:
    """Free space on the filesystem of an SQLite store (a full disk stops every commit, webhooks too)."""
    directory = path.parent
    try:
        total, _used, free = usage(directory)
    except OSError as exc:
        return _warn(
            "disk space",
            f"cannot measure free space in {directory}: {exc.strerror or exc}",
            "check that the directory exists and is readable",
        )
    size = sum(
        (Path(str(path) + suffix).stat().st_size for suffix in ("", "-wal") if Path(str(path) + suffix).exists()), 0
    )
    fraction = free / total if total else 0.0
    detail = f"{_bytes(free)} free of {_bytes(total)} ({fraction:.0%}) in {directory}; the store takes {_bytes(size)}"
    fix = "free space on that filesystem; `amohook prune` deletes old finished work"
    if free < DISK_ERROR_BYTES:
        return _error("disk space", detail, fix)
    if free < DISK_WARN_BYTES or fraction < DISK_WARN_FRACTION:
        return _warn("disk space", detail, fix)
    return _ok("disk space", detail)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# -- all of it ----------------------------------------------------------------------------------
def run_checks(
    store: Store, *, rules_path: str | None = None, now: float | None = None, client_factory: Callable | None = None
) -> list[Check]:
    """Every check, in the order an admin reads them. ``client_factory(store, subdomain)`` makes
    the API client (default: the usual shared-limit client, two attempts)."""
    from amohook.store.models import Account

    now = time.time() if now is None else now
    factory = client_factory or _default_client
    database = check_database(store)
    if not database.ok:
        return [database]  # the rest would fail for the same reason
    checks = [database]
    accounts = list(Account.select().order_by(Account.subdomain))
    if not accounts:
        checks.append(_error("accounts", "no account in the store", "run `amohook init-auth` to connect one"))
    skews: dict[str, float] = {}
    for account in accounts:
        checks.extend(check_account(store, account, now, factory, skews))
    if rules_path:
        checks.append(check_rules(rules_path))
    for account in accounts:
        reconciliation = check_reconciliation(account.subdomain, now, skews.get(account.subdomain))
        for check in (check_subscriptions(account.subdomain, now), reconciliation):
            if check is not None:
                checks.append(check)
    checks += [check_dead_events(), check_pending_events(now), check_failed_actions()]
    if store.sqlite_path is not None:  # an SQLite store
        checks.append(check_disk(store.sqlite_path))
    return checks
