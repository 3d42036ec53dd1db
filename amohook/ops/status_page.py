"""``GET /status`` (an HTML page for a person) and ``GET /metrics`` (for Prometheus), behind a password.

Both are off unless ``AMOHOOK_STATUS_PASSWORD`` is set: without it the routes answer 404, the
same as any unknown path, so a listener on the internet shows nothing it was not asked to. With
it they want HTTP Basic auth: any user name (the README says "admin"), that password, compared in
constant time; failures are slowed down per client address (``throttle``: 429 from the event
loop after ten) and summed up in the log, not written one by one. Nothing is read before the
password checks out, and what is read comes from the overview thread's cached snapshot
(``overview.OverviewReader``), never one read per request; the rendered page is kept with its
snapshot.

The page is plain HTML: no script (the CSP forbids any), one stylesheet allowed by its hash, a
``<meta refresh>`` every 30 s. Everything that came from amoCRM or a webhook — account names,
lead names, task texts, error messages — is escaped, control characters made visible.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from amohook.actions.registry import noun
from amohook.durations import format_duration
from amohook.errors import ConfigError
from amohook.ops import doctor
from amohook.ops import metrics as metrics_module
from amohook.ops.overview import OverviewReader, Snapshot
from amohook.ops.throttle import LoginThrottle
from amohook.times import human_time

if TYPE_CHECKING:
    from amohook.store import Store

ROUTES = ("/status", "/metrics")
MIN_PASSWORD_LENGTH = 12
MIN_DISTINCT = 6  # different characters in the password
REFRESH_SECONDS = 30
REALM = "amohook"

STYLE = (
    "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:78em;padding:0 1em;color:#222}"
    "h1{font-size:1.5em;margin:0}h2{font-size:1.15em;margin:1.6em 0 .4em}"
    "table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;padding:.25em .5em;"
    "text-align:left;vertical-align:top}th{background:#f4f4f4}"
    "td.n{text-align:right;font-variant-numeric:tabular-nums}"
    ".ok{color:#176f2c}.warning{color:#8a5a00}.error{color:#b00020}"
    ".badge{display:inline-block;padding:.1em .6em;border-radius:.3em;color:#fff;font-size:.8em;"
    "vertical-align:middle}.badge.ok{background:#176f2c}.badge.warning{background:#b07800}"
    ".badge.error{background:#b00020}.muted{color:#666}.fix{color:#444;font-size:.92em}"
    "dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{color:#555}dd{margin:0}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
# No script, nothing loaded, never framed, no form; only the one <style> element, by its hash.
SECURITY_HEADERS = (
    (
        "Content-Security-Policy",
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
_TEXT = "text/plain; charset=utf-8"
_HTML = "text/html; charset=utf-8"


_MAKE_ONE = '(e.g. `python3 -c "import secrets; print(secrets.token_urlsafe(18))"`)'


def check_status_password(password: str | None) -> str | None:
    """None (the pages are off) or a password fit to stand on the internet: at least
    ``MIN_PASSWORD_LENGTH`` characters, not only whitespace, at least ``MIN_DISTINCT`` different
    characters (twelve spaces or ``aaaaaaaaaaaa`` are long but guessed first). The message never
    shows the password."""
    if not password:
        return None
    problem = None
    if len(password) < MIN_PASSWORD_LENGTH:
        problem = f"is {len(password)} characters; use at least {MIN_PASSWORD_LENGTH}"
    elif not password.strip():
        problem = "is only whitespace; use a random one"
    elif len(set(password)) < MIN_DISTINCT:
        problem = f"repeats too few characters ({len(set(password))} different); use a random one"
    if problem:
        raise ConfigError(
            f"AMOHOOK_STATUS_PASSWORD {problem} {_MAKE_ONE}, or unset it to turn /status and /metrics off"
        )
    from amohook.redact import hold_secret

    hold_secret(password)
    return password


def authorized(header: str | None, password: str) -> bool:
    """An ``Authorization: Basic`` header carrying ``password`` (any user name); constant time."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return False
    _user, sep, given = decoded.partition(":")
    if not sep:
        return False
    # Digests of equal length: the comparison tells nothing about the password's length either.
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(password.encode()).digest())


class AdminPages:
    """Answers /status and /metrics for one listener; ``answer`` returns what to send."""

    def __init__(
        self,
        password: str | None,
        store: Store,
        server,
        listener_metrics: metrics_module.ListenerMetrics,
        *,
        fresh: float | None = None,
        throttle: LoginThrottle | None = None,
        runtime: Callable[[], dict] | None = None,
    ):
        self.password = check_status_password(password)
        self.throttle = throttle or LoginThrottle()
        self.runtime = runtime  # the supervisor's health, when the listener runs under one
        self.server = server  # open_connections() and committer
        self.listener_metrics = listener_metrics
        kwargs = {} if fresh is None else {"fresh": fresh}
        self.reader = OverviewReader(store, **kwargs)
        self._started = False
        self._lock = threading.Lock()
        self._page: tuple[object, object, str] | None = None  # (snapshot, (error, loops), rendered page)

    def stop(self) -> None:
        self.throttle.flush()
        if self._started:
            self.reader.stop()

    def barred(self, client_ip: str) -> tuple[int, str, str, tuple] | None:
        """The 429 for an address that failed too often (``throttle``), else None; no thread needed."""
        if self.password is None:
            return None
        wait = self.throttle.retry_after(client_ip)
        if not wait:
            return None
        return (
            429,
            "too many failed passwords from your address; try again later\n",
            _TEXT,
            (("Retry-After", str(wait)),),
        )

    def answer(self, method: str, path: str, headers, client_ip: str = "?") -> tuple[int, str, str, tuple]:
        """(status, body, content type, headers) for a request to one of ``ROUTES``."""
        if self.password is None:
            return 404, "not found\n", _TEXT, ()
        if method not in ("GET", "HEAD"):
            return 405, "use GET\n", _TEXT, (("Allow", "GET, HEAD"),)
        barred = self.barred(client_ip)
        if barred is not None:
            return barred
        if authorized(headers.get("Authorization"), self.password):
            self.throttle.succeeded(client_ip)
        else:
            self.throttle.failed(client_ip)
            return (
                401,
                "authentication required\n",
                _TEXT,
                (("WWW-Authenticate", f'Basic realm="{REALM}"'), *SECURITY_HEADERS),
            )
        snapshot, error = self._snapshot()
        if path == "/metrics":
            text = metrics_module.render(
                self.listener_metrics,
                snapshot=snapshot,
                read_error=error,
                committer=self.server.committer,
                connections=self.server.open_connections(),
                runtime=self.runtime() if self.runtime is not None else None,
            ).decode("utf-8")
            return 200, text, metrics_module.CONTENT_TYPE, SECURITY_HEADERS
        return (200 if snapshot is not None else 503), self._render(snapshot, error), _HTML, SECURITY_HEADERS

    def _snapshot(self):
        with self._lock:
            if not self._started:
                self.reader.start()
                self._started = True
        return self.reader.get()

    def _render(self, snapshot: Snapshot | None, error: str | None) -> str:
        loops = loop_states(self.runtime() if self.runtime is not None else None)
        with self._lock:
            cached = self._page
            if cached is not None and cached[0] is snapshot and cached[1] == (error, loops):
                return cached[2]
        page = render_page(
            snapshot,
            error,
            listener=self.listener_metrics,
            committer=self.server.committer,
            connections=self.server.open_connections(),
            loops=loops,
        )
        with self._lock:
            self._page = (snapshot, (error, loops), page)
        return page


# -- the page ------------------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def esc(value: object) -> str:
    """Outside text as HTML text: escaped, control and bidi characters shown as \\xNN / \\uNNNN."""
    text = "" if value is None else str(value)
    text = _CONTROL.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text
    )
    return html.escape(text, quote=True)


def _clip(value: object, limit: int = 200) -> str:
    text = "" if value is None else str(value).strip()
    first = text.splitlines()[0] if text else ""
    return first[:limit] + ("…" if len(first) > limit or len(text) > len(first) else "")


def _table(headings: list[str], rows: list[list[str]], empty: str) -> str:
    """``rows`` hold HTML already escaped; a cell starting with "\\0n" is right-aligned (a number)."""
    if not rows:
        return f'<p class="muted">{esc(empty)}</p>\n'
    head = "".join(f"<th>{esc(h)}</th>" for h in headings)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="n">{c[2:]}</td>' if c.startswith("\0n") else f"<td>{c}</td>" for c in row)
        + "</tr>\n"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>\n"


def _num(value: object) -> str:
    return "\0n" + esc(value)


def _mark(check) -> str:
    symbol = "✓" if check.ok else "✗"
    return f'<span class="{esc(check.severity)}">{symbol}</span>'


def token_checks(snapshot: Snapshot) -> list:
    """The stored token state as doctor-like checks (no amoCRM call: doctor makes that one)."""
    checks = []
    for view in snapshot.accounts:
        token = view.token
        if not token.has_tokens:
            checks.append(
                doctor.Check(
                    "token",
                    False,
                    "error",
                    "no tokens stored",
                    f"run `amohook init-auth --subdomain {view.subdomain}`",
                    view.subdomain,
                )
            )
        elif token.expires_at is not None and token.expires_at <= snapshot.read_at:
            checks.append(
                doctor.Check(
                    "token",
                    False,
                    "error",
                    "the access token has expired",
                    "run `amohook refresh-token` (is cron running?)",
                    view.subdomain,
                )
            )
        elif token.warning:
            checks.append(doctor.Check("token", False, "warning", token.warning, "", view.subdomain))
        else:
            left = ""
            if token.expires_at is not None:
                left = f", expires in {format_duration(token.expires_at - snapshot.read_at)}"
            checks.append(doctor.Check("token", True, "ok", f"stored{left}", "", view.subdomain))
    return checks


def loop_states(runtime: dict | None) -> tuple[tuple[str, str, int, str | None], ...]:
    """(name, state, restarts, last error) of each of the supervisor's loops, for the page."""
    loops = (runtime or {}).get("loops") or {}
    return tuple(
        (name, str(v.get("state")), int(v.get("restarts") or 0), v.get("last_error"))
        for name, v in sorted(loops.items())
    )


def render_page(
    snapshot: Snapshot | None,
    error: str | None,
    *,
    listener,
    committer,
    connections: int,
    loops: tuple = (),
    now: float | None = None,
) -> str:
    """The whole page. ``snapshot`` None: the store was never read; the page says why."""
    now = time.time() if now is None else now
    checks = []
    if snapshot is not None:  # as doctor orders them: the database, each account, then the queue
        checks = [c for c in snapshot.checks if c.name in ("database", "accounts")]
        for view, token in zip(snapshot.accounts, token_checks(snapshot), strict=True):
            checks += [token, *view.checks]
        checks += [c for c in snapshot.checks if c.name not in ("database", "accounts")]
    state = "error" if error or snapshot is None else doctor.worst(checks)
    parts = [
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f"<title>amohook: {esc(state)}</title>\n<style>{STYLE}</style>\n</head><body>\n",
        f'<header><h1>amohook status <span class="badge {esc(state)}" id="state">{esc(state)}</span></h1>\n',
        f'<p class="muted">{esc(human_time(now))} · refreshes every {REFRESH_SECONDS} s',
    ]
    if snapshot is not None:
        parts.append(f" · store read {esc(format_duration(now - snapshot.read_at))} ago")
    parts.append("</p></header>\n")
    if error:
        parts.append(
            f'<p class="error" id="store-error">The database cannot be read now: {esc(error)}.'
            + (" The figures below are from the last read that worked." if snapshot else "")
            + "</p>\n"
        )
    if snapshot is not None:
        parts += [_checks(checks), _accounts(snapshot)]
    parts.append(_queue(snapshot, listener, committer, connections))
    if loops:
        parts.append(_loops(loops))
    if snapshot is not None:
        parts += [
            _today(snapshot),
            _events("Last 50 events", "events", snapshot.recent, snapshot.read_at),
            _events(f"Dead events ({snapshot.queue.dead})", "dead", snapshot.dead, snapshot.read_at),
        ]
    parts.append("</body></html>\n")
    return "".join(parts)


def _checks(checks: list) -> str:
    rows = [
        [
            _mark(c),
            esc(c.name),
            esc(c.account or ""),
            esc(c.detail) + (f'<div class="fix">fix: {esc(c.fix)}</div>' if c.fix and not c.ok else ""),
        ]
        for c in checks
    ]
    return (
        '<section id="checks"><h2>Checks</h2>\n' + _table(["", "check", "account", "detail"], rows, "") + "</section>\n"
    )


def _accounts(snap: Snapshot) -> str:
    rows = []
    for view in snap.accounts:
        token, rec = view.token, view.reconcile
        if not token.has_tokens:
            access = '<span class="error">no tokens</span>'
        elif token.expires_at is None:
            access = "long-lived, no expiry" if token.long_lived else "no expiry stored"
        elif token.expires_at <= snap.read_at:
            access = f'<span class="error">expired {esc(format_duration(snap.read_at - token.expires_at))} ago</span>'
        else:
            access = f"expires in {esc(format_duration(token.expires_at - snap.read_at))}"
        if token.long_lived:
            access += " (long-lived)"
        age = token.refresh_token_age
        refresh = "—" if age is None else f"issued {esc(format_duration(age))} ago"
        reconcile = (
            f"last pass {esc(format_duration(None if rec.last_pass_at is None else snap.read_at - rec.last_pass_at))}"
            f" ago; lag {esc(format_duration(rec.lag))}; recovered in 24 h: {esc(rec.recovered_24h)}"
        )
        if rec.last_pass_at is None:
            reconcile = "never ran"
        subscription = esc(rec.subscription) + (
            f' <span class="muted">{esc(_clip(rec.subscription_note, 120))}</span>' if rec.subscription_note else ""
        )
        rows.append([esc(view.subdomain), access, refresh, reconcile, subscription])
    more = ""
    if snap.accounts_total > len(snap.accounts):
        more = f'<p class="muted">{len(snap.accounts)} of {snap.accounts_total} accounts shown.</p>\n'
    return (
        '<section id="accounts"><h2>Accounts</h2>\n'
        + _table(
            ["account", "access token", "refresh token", "reconciliation", "subscription"],
            rows,
            "No account connected: run `amohook init-auth`.",
        )
        + more
        + "</section>\n"
    )


def _queue(snap: Snapshot | None, listener, committer, connections: int) -> str:
    items = []
    if snap is not None:
        q = snap.queue
        items += [
            ("pending", f"{q.pending} ({q.due} due)"),
            ("running", q.running),
            ("dead", q.dead),
            ("done (until pruned)", snap.events_by_status.get("done", 0)),
            ("oldest pending", "—" if q.oldest_pending_age is None else format_duration(q.oldest_pending_age) + " old"),
            ("actions", ", ".join(f"{k} {v}" for k, v in snap.actions_by_status.items())),
        ]
    health = committer.health()
    webhooks = listener.webhooks()
    answered = ", ".join(f"{code}: {count}" for code, count in sorted(webhooks.items())) or "none yet"
    items += [
        ("commits", f"failing: {health.failure}" if health.failing else "ok"),
        ("waiting for the writer", committer.queued()),
        ("connections", connections),
        ("webhooks answered since start", answered),
    ]
    body = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items)
    return f'<section id="queue"><h2>Queue and listener</h2>\n<dl>{body}</dl></section>\n'


def _loops(loops: tuple) -> str:
    rows = [
        [
            esc(name),
            f'<span class="{"ok" if state == "running" else "error"}">{esc(state)}</span>',
            _num(restarts),
            esc(_clip(last_error)) if last_error else "",
        ]
        for name, state, restarts, last_error in loops
    ]
    return (
        '<section id="loops"><h2>Loops</h2>\n'
        + _table(["loop", "state", "restarts", "last error"], rows, "")
        + "</section>\n"
    )


def _today(snap: Snapshot) -> str:
    rows = [
        [
            esc(human_time(a.updated_at)),
            esc(a.account),
            esc(noun(a.kind)),
            esc(a.rule),
            _num(a.entity_id if a.entity_id is not None else "—"),
            esc(_clip(a.text, 160)),
            _num(a.result_id if a.result_id is not None else "—"),
            _num(a.event_id if a.event_id else "—"),
        ]
        for a in snap.today
    ]
    shown = (
        f" ({snap.today_total})"
        if snap.today_total == len(snap.today)
        else f" ({len(snap.today)} newest of {snap.today_total})"
    )
    return (
        f'<section id="today"><h2>Tasks and notes created today{shown}</h2>\n'
        f'<p class="muted">since {esc(human_time(snap.today_since))}</p>\n'
        + _table(["time", "account", "kind", "rule", "lead", "text", "amoCRM id", "event"], rows, "None yet today.")
        + "</section>\n"
    )


def _events(title: str, anchor: str, events: list, read_at: float) -> str:
    rows = []
    for e in events:
        what = f"{esc(e.entity)} {esc(e.action)}" + (f" #{esc(e.entity_id)}" if e.entity_id else "")
        outcome = (
            f'<span class="{"error" if e.status == "dead" else "ok" if e.status == "done" else "muted"}">'
            f"{esc(e.status)}</span>"
        )
        error = f'<div class="fix">{esc(_clip(e.last_error))}</div>' if e.last_error else ""
        rows.append(
            [
                _num(e.id),
                esc(human_time(e.received_at)),
                esc(e.account or "—"),
                what,
                esc(e.name or ""),
                outcome + error,
                _num(e.attempts),
                esc(e.source),
            ]
        )
    return (
        f'<section id="{anchor}"><h2>{esc(title)}</h2>\n'
        + _table(["id", "received", "account", "entity", "name", "outcome", "attempts", "source"], rows, "None.")
        + "</section>\n"
    )
