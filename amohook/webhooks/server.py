"""The webhook listener: receive, store durably, acknowledge — and nothing else.

amoCRM waits at most 2 seconds for a 2xx and switches a webhook off after more than 100 failed
answers in 2 hours (docs/amocrm.md §5 "Response, retries, disabling"), so every request is answered
quickly and never with a traceback: a body that cannot be read gets its 4xx, a store that cannot
commit gets 503 (amoCRM retries), and 200 is sent only after the delivery and its events are
committed. Storing is handed to one writer thread that commits many requests per transaction
(``inbox.GroupCommitter``); processing happens later, in the worker.

Routes: ``POST /webhook/<secret>``, ``GET /healthz``, ``GET /oauth/callback``, and with a password
``GET /status`` and ``GET /metrics`` (ops/status_page.py); anything else 404/405, answered by
the event loop from the request line without taking a thread (``WebhookHTTPServer.route_head``).
Only a webhook with the right secret may take any handler thread; the other routes share a few.
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from amohook import inbox
from amohook.errors import AmohookError, ConfigError, describe
from amohook.inbox import GroupCommitter, Incoming, StoreUnavailable, ticket_outcome
from amohook.ops import health, metrics, status_page
from amohook.redact import MIN_SECRET_LENGTH, hold_secret, redact_target
from amohook.runtime.loop import STOP_SECONDS, remaining
from amohook.webhooks.http_server import (
    TRUSTED,
    UNTRUSTED,
    Answer,
    Conn,
    HardenedHTTPServer,
    HardenedRequestHandler,
    head_end,
    plain_headers,
    quick_answer,
)
from amohook.webhooks.parse import BodyRejected, parse_webhook

if TYPE_CHECKING:
    from amohook.store import Store

log = logging.getLogger("amohook.server")

_SECRET_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


@dataclass(frozen=True)
class ServerConfig:
    secret: str
    host: str = "127.0.0.1"
    port: int = 8080
    max_body: int = 1024 * 1024
    # amoCRM's budget is 2 s for the whole exchange; a commit not confirmed within this answers 503.
    commit_timeout: float = 1.5
    socket_timeout: float = 10.0  # the longest silence while reading a request
    read_deadline: float = 30.0  # the longest time to read one request, however it trickles in
    # The default of 5 makes connections wait a second or more under a burst; with a full accept
    # queue the kernel drops SYNs and the client retries only after 1 s. Linux caps it at somaxconn.
    backlog: int = 4096
    stop_grace: float = 3.0  # on stop, how long requests already being handled may take
    # A connection takes a thread only once its request head has arrived (webhooks/http_server.py):
    max_workers: int = 64  # threads handling requests whose head has arrived
    # ... of which requests without the webhook secret (health, OAuth, status pages, request
    # lines left to http.server) take at most this many at once; the others wait in a line of
    # their own (at most max_queued; more: 503). The rest stay free for real webhooks.
    max_untrusted: int = 16
    max_connections: int = 1024  # connections held open; also kept below the open-file limit
    max_queued: int = 512  # complete request heads waiting for a thread (per line); more: 503 at once
    status_password: str | None = None  # /status and /metrics answer 404 without it


def check_secret(secret: str | None) -> str:
    """The webhook secret goes in the URL path: long enough to be unguessable, URL-safe."""
    if not secret:
        raise ConfigError(
            "no webhook secret — set AMOHOOK_WEBHOOK_SECRET (or --secret) to a random string of at least "
            f"{MIN_SECRET_LENGTH} characters, e.g. the output of "
            '`python3 -c "import secrets; print(secrets.token_urlsafe(24))"`'
        )
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"the webhook secret is {len(secret)} characters; use at least {MIN_SECRET_LENGTH} "
            '(e.g. `python3 -c "import secrets; print(secrets.token_urlsafe(24))"`)'
        )
    if not set(secret) <= _SECRET_CHARS:
        raise ConfigError("the webhook secret goes into the URL: use only letters, digits and - . _ ~")
    hold_secret(secret)
    return secret


# The OAuth page: the address carries a one-time code, so keep it out of caches and other sites'
# logs (Cache-Control, Referrer-Policy); the page loads nothing, runs nothing and is never framed
# (its one inline style attribute is all the CSP allows).
_PAGE_HEADERS = (
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
)


def log_answer(client_ip: str, command: str, target: str, code: object, secret: str) -> None:
    """One line per answer, without the secret: DEBUG for 100 and 200, INFO for the rest."""
    if isinstance(code, HTTPStatus):
        code = code.value
    level = logging.DEBUG if code in (100, 200) else logging.INFO
    if log.isEnabledFor(level):
        command = redact_target(command or "-", secret, limit=24)
        log.log(level, "%s %s %s %s", client_ip, command, redact_target(target, secret), code)


_NOT_FOUND = Answer(404, "not found\n")
_UNAVAILABLE = "cannot store the webhook now; retry later\n"
_USE_POST = Answer(405, "use POST\n", (("Allow", "POST"),))
_USE_GET = Answer(405, "use GET\n", (("Allow", "GET, HEAD"),))


def _is_webhook_route(path: str) -> bool:
    return path == "/webhook" or path.startswith("/webhook/")


class _Handler(HardenedRequestHandler):
    """The routes: a webhook, the health answer, the OAuth redirect."""

    server: WebhookHTTPServer

    def handle_expect_100(self) -> bool:
        # Invite the body only when it will be read; otherwise the final answer (404, 411, 413…)
        # goes out instead of "100 Continue", and the body is never sent.
        if self.command == "POST" and self.server.secret_ok(self.path.split("?", 1)[0]):
            length = self.headers.get("Content-Length", "").strip()
            if length.isdigit() and int(length) <= self.server.config.max_body:
                return super().handle_expect_100()
        return True

    def log_request(self, code="-", size="-") -> None:
        if code in (401, 429) and self.path.split("?", 1)[0] in status_page.ROUTES:
            return  # a failed password: the throttle sums these up (one line a minute at most)
        log_answer(self.client_address[0], self.command, self.path, code, self.server.config.secret)

    def log_message(self, format: str, *args) -> None:
        if log.isEnabledFor(logging.DEBUG):  # the standard library's messages may quote the request line
            log.debug("%s %s", self.client_address[0], redact_target(format % args, self.server.config.secret))

    # -- routes -------------------------------------------------------------------------------
    def do_GET(self) -> None:
        try:
            self._route()
        except (ConnectionError, TimeoutError):
            raise
        except Exception:
            # A bug: the stack goes to the log, never into the answer.
            secret = self.server.config.secret
            log.exception(
                "unexpected error answering %s %s",
                redact_target(self.command, secret, limit=24),
                redact_target(self.path, secret),
            )
            self.reply_quietly(500, "internal error\n")

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _route(self) -> None:
        # Most requests that get here were routed by the event loop already (route_head); the
        # rest (request lines the loop leaves to http.server: HTTP/0.9 style, other versions)
        # take the same decision here.
        path = self.path.split("?", 1)[0]
        decision = self.server.decide(self.command, path)
        if _is_webhook_route(path) and self.command == "POST":
            try:
                if isinstance(decision, Answer):
                    self.reply(decision.status, decision.text, headers=decision.headers)
                else:
                    self._webhook(path)
            except Exception:
                self.server.metrics.webhook_answered(None)
                raise
            return self.server.metrics.webhook_answered(getattr(self, "status_sent", None))
        if isinstance(decision, Answer):
            return self.reply(decision.status, decision.text, headers=decision.headers)
        if path == "/healthz":
            return self._healthz()
        if path == "/oauth/callback":
            return self._oauth_callback()
        if path in status_page.ROUTES:
            return self.reply(*self.server.admin.answer(self.command, path, self.headers, self.client_address[0]))
        self.reply(_NOT_FOUND.status, _NOT_FOUND.text)  # not reached: decide() answers every other path

    def _webhook(self, path: str) -> None:
        if not self.server.secret_ok(path):
            return self.reply(_NOT_FOUND.status, _NOT_FOUND.text)
        length = self._content_length()
        if length is None:
            return
        body = self._read_body(length)
        if body is None:
            return
        content_type = self.headers.get("Content-Type")
        try:
            parsed = parse_webhook(body, content_type)
            inbox.check_storable(body, parsed)
        except BodyRejected as exc:
            return self.reply(exc.status, exc.reason + "\n")
        item = Incoming(
            body=body,
            parsed=parsed,
            content_type=content_type,
            headers=inbox.useful_headers(self.headers.items()),
            remote_addr=self.client_address[0],
        )
        try:
            stored = self.server.committer.submit(item, self.server.config.commit_timeout)
        except StoreUnavailable as exc:
            log.warning("answered 503: %s", exc.message)
            return self.reply(503, _UNAVAILABLE)
        self.reply(200, "ok\n" if stored.new else "ok (already stored)\n")

    def _content_length(self) -> int | None:
        if self.headers.get("Transfer-Encoding") is not None:
            self.reply(411, "send the body with Content-Length (chunked bodies are not accepted)\n")
            return None
        values = [v.strip() for v in self.headers.get_all("Content-Length") or []]
        if not values:
            self.reply(411, "Content-Length required\n")
            return None
        if len(set(values)) != 1 or not values[0].isascii() or not values[0].isdigit() or len(values[0]) > 15:
            self.reply(400, "invalid Content-Length\n")
            return None
        length = int(values[0])
        if length > self.server.config.max_body:
            self.reply(413, f"body larger than {self.server.config.max_body} bytes\n")
            return None
        return length

    def _read_body(self, length: int) -> bytes | None:
        try:
            body = self.rfile.read(length) if length else b""
        except TimeoutError:
            self.reply_quietly(408, "request body not received in time\n")
            return None
        finally:
            self.server.reading_done(self)
        self.body_read = True
        if len(body) < length:
            if self.expired:
                self.reply_quietly(408, "request body not received in time\n")
            else:
                self.reply_quietly(400, "body shorter than Content-Length\n")
            return None
        return body

    def _healthz(self) -> None:
        # From memory only (ops/health.py): no database connection per request.
        status, payload = health.answer(
            self.server.committer, self.server.queue_watch, connections=self.server.open_connections()
        )
        self.reply(status, json.dumps(payload) + "\n", "application/json", headers=(("Cache-Control", "no-store"),))

    def _oauth_callback(self) -> None:
        if self.command == "HEAD":
            # Link previews and prefetchers send HEAD: answer with the headers of a page and
            # change nothing, so the admin's own GET still completes the authorization.
            return self._page(200, "amohook authorization", "Open this address to complete the authorization.")
        query = self.path.split("?", 1)[1] if "?" in self.path else ""
        try:
            params = parse_qs(query, keep_blank_values=True, max_num_fields=50)
        except ValueError:
            return self._page(400, "Not an authorization redirect", "The address carries too many parameters.")
        get = lambda name: (params.get(name) or [""])[0].strip()  # noqa: E731
        error = get("error")
        if error:
            if error == "access_denied":
                return self._page(
                    400,
                    "Access was not granted",
                    "amoCRM says access was denied (the “Deny” button, or the window was closed). "
                    "Nothing was stored. To try again, run `amohook auth-url` and open the new link.",
                )
            return self._page(
                400,
                "amoCRM reported an error",
                f"amoCRM redirected here with error “{error[:100]}”. Run `amohook auth-url` to start again.",
            )
        code, state, referer = get("code"), get("state"), get("referer")
        if not code or not state:
            return self._page(
                400,
                "Not an authorization redirect",
                "This address is where amoCRM sends the admin after granting access; it needs the code and "
                "state amoCRM adds. Start with `amohook auth-url`.",
            )
        from amohook.auth import complete_authorization

        store = self.server.store
        try:
            account = complete_authorization(store, state=state, code=code, referer=referer or None)
        except AmohookError as exc:
            return self._page(400, "Authorization failed", exc.message)
        except Exception as exc:
            import peewee

            if isinstance(exc, peewee.PeeweeException):
                log.warning("oauth callback: the database is not usable: %s", describe(exc))
                return self._page(
                    503,
                    "Authorization failed",
                    "The database is not available right now; "
                    "nothing was stored. Run `amohook auth-url` again once it is back.",
                )
            log.exception("oauth callback failed")
            return self._page(500, "Authorization failed", "An unexpected error; the amohook log has the details.")
        finally:
            store.close_quietly()
        self._page(
            200,
            "amohook is connected",
            f"The account “{account.subdomain}” is authorized and its tokens are stored. You can close this page; "
            "`amohook status` shows the tokens.",
        )

    def _page(self, status: int, title: str, message: str) -> None:
        page = (
            f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
            '<body style="font-family: sans-serif; max-width: 40em; margin: 3em auto">\n'
            f"<h1>{html.escape(title)}</h1>\n<p>{html.escape(message)}</p>\n</body></html>\n"
        )
        self.reply(
            status,
            page,
            "text/html; charset=utf-8",
            headers=_PAGE_HEADERS,
        )


class WebhookHTTPServer(HardenedHTTPServer):
    """The hardened server (webhooks/http_server.py) with what the routes need: the secret, the
    store, the group-commit writer and the queue watch behind /healthz."""

    def __init__(
        self, config: ServerConfig, store: Store, committer: GroupCommitter, runtime: Callable[[], dict] | None = None
    ):
        self.store = store
        self.committer = committer
        self._secret_bytes = check_secret(config.secret).encode("ascii")
        self.queue_watch = health.QueueWatch(store)
        self.metrics = metrics.ListenerMetrics()
        committer.on_batch = self.metrics.observe_commit
        self.admin = status_page.AdminPages(config.status_password, store, self, self.metrics, runtime=runtime)
        # Webhooks taken whole in the event loop, until their commit: deadline, target, ticket.
        self._pending: dict[Conn, tuple[float, str, object]] = {}
        super().__init__(config, _Handler)
        self.queue_watch.start()

    def secret_ok(self, path: str) -> bool:
        """``path`` (without the query) is ``/webhook/<the secret>``, a trailing slash allowed."""
        candidate = path[len("/webhook/") :].rstrip("/") if path.startswith("/webhook/") else ""
        # Constant time: the answer must not tell how much of a guessed secret was right.
        return hmac.compare_digest(candidate.encode("latin-1", "replace"), self._secret_bytes)

    def decide(self, method: str, path: str) -> Answer | str:
        """The route's answer when the method and path (without the query) settle it, else the
        share of threads the request may take: ``TRUSTED`` only for a webhook with the secret."""
        if not hasattr(_Handler, "do_" + method):
            return Answer(405, "method not allowed\n", (("Allow", _Handler.allow),))
        if _is_webhook_route(path):
            if method != "POST":
                return _USE_POST
            return TRUSTED if self.secret_ok(path) else _NOT_FOUND
        if path in ("/healthz", "/oauth/callback"):
            return UNTRUSTED if method in ("GET", "HEAD") else _USE_GET
        if path in status_page.ROUTES:
            return UNTRUSTED  # the password (a header) is checked in a thread
        return _NOT_FOUND

    def route_head(self, method: str, target: str, client_ip: str) -> Answer | str:
        """``decide`` in the event loop; an answer given there is logged and counted here, as the
        handler would have."""
        path = target.split("?", 1)[0]
        if path in status_page.ROUTES:
            barred = self.admin.barred(client_ip)
            if barred is not None:  # too many failed passwords: answered here, counted, not logged
                status, text, _type, headers = barred
                return Answer(status, text, headers)
        decision = self.decide(method, path)
        if isinstance(decision, Answer):
            if method == "POST" and _is_webhook_route(target.split("?", 1)[0]):
                self.metrics.webhook_answered(decision.status)
            log_answer(client_ip, method, target, decision.status, self.config.secret)
        return decision

    def take(self, conn: Conn, method: str, target: str) -> bool:
        """A webhook whose head and whole body have arrived together (amoCRM's always do) and
        whose head is plain (``plain_headers``) is parsed here and handed to the writer, and the
        loop answers once it is committed: no thread, no hand-offs between threads. It gets the
        answers ``_Handler._webhook`` would give; anything else (no or odd Content-Length, a body
        still coming, Expect, Transfer-Encoding) takes a thread as before."""
        submit_later = getattr(self.committer, "submit_later", None)  # bench/ack.py --with-naive: none
        if method != "POST" or submit_later is None:
            return False
        buf = conn.buf
        end = head_end(buf, 0)
        headers = plain_headers(buf[:end])
        if headers is None:
            return False
        length = content_type = None
        for name, value in headers:
            key = name.lower()
            if key == "content-length":
                if length is not None:
                    return False
                length = value.strip()
            elif key == "content-type":
                if content_type is None:
                    content_type = value
            elif key in ("transfer-encoding", "expect"):
                return False
        if length is None or not length.isascii() or not length.isdigit() or len(length) > 15:
            return False
        if int(length) > self.config.max_body or len(buf) - end != int(length) or not self.hold(conn):
            return False
        body = buf[end:]
        client_ip = conn.addr[0] if conn.addr else "?"
        try:
            parsed = parse_webhook(body, content_type)
            inbox.check_storable(body, parsed)
            item = Incoming(
                body=body,
                parsed=parsed,
                content_type=content_type,
                headers=inbox.useful_headers(headers),
                remote_addr=client_ip,
            )
        except BodyRejected as exc:
            self._answer_webhook(conn, target, exc.status, exc.reason + "\n")
            return True
        except Exception:  # a bug: as _Handler.do_GET, the stack to the log, never into the answer
            secret = self.config.secret
            log.exception(
                "unexpected error answering %s %s",
                redact_target(method, secret, limit=24),
                redact_target(target, secret),
            )
            self._answer_webhook(conn, target, 500, "internal error\n", counted=False)
            return True
        self._pending[conn] = (time.monotonic() + self.config.commit_timeout, target, None)
        try:
            ticket = submit_later(item, lambda ticket: self.in_loop(self._committed, conn, ticket, time.monotonic()))
        except StoreUnavailable as exc:
            del self._pending[conn]
            log.warning("answered 503: %s", exc.message)
            self._answer_webhook(conn, target, 503, _UNAVAILABLE)
            return True
        if conn in self._pending:  # not yet answered (the writer may be quicker than this line)
            self._pending[conn] = (self._pending[conn][0], target, ticket)
        return True

    def _committed(self, conn: Conn, ticket, done_at: float) -> None:
        """The writer is done with a webhook taken whole (at ``done_at``): answer it, unless its
        time ran out. A commit confirmed after ``commit_timeout`` is answered 503, as a thread's
        ``GroupCommitter.submit`` answers it, even when the loop's sweep has not come round yet."""
        entry = self._pending.pop(conn, None)
        if entry is None:
            return  # answered 503 at its deadline (held_deadlines)
        if done_at > entry[0]:
            log.warning("answered 503: no commit within %.1f s (commit in flight)", self.config.commit_timeout)
            return self._answer_webhook(conn, entry[1], 503, _UNAVAILABLE)
        try:
            stored = ticket_outcome(ticket)
        except StoreUnavailable as exc:
            log.warning("answered 503: %s", exc.message)
            return self._answer_webhook(conn, entry[1], 503, _UNAVAILABLE)
        self._answer_webhook(conn, entry[1], 200, "ok\n" if stored.new else "ok (already stored)\n")

    def held_deadlines(self, now: float) -> None:
        """Webhooks taken whole and not committed within ``commit_timeout``: withdrawn if the writer
        has not taken them yet, and answered 503 either way (as ``GroupCommitter.submit`` does)."""
        for conn, (deadline, target, ticket) in list(self._pending.items()):
            if deadline <= now and ticket is not None and self._pending.pop(conn, None) is not None:
                failure = self.committer.give_up(ticket, self.config.commit_timeout)  # type: ignore[arg-type]
                log.warning("answered 503: %s", failure.message if failure is not None else "no commit in time")
                self._answer_webhook(conn, target, 503, _UNAVAILABLE)

    def _answer_webhook(self, conn: Conn, target: str, status: int, text: str, counted: bool = True) -> None:
        """Log, count and send the answer to a webhook taken whole, as ``_Handler.reply`` and
        ``_route`` would (a bug is counted as no answer, as there)."""
        log_answer(conn.addr[0] if conn.addr else "?", "POST", target, status, self.config.secret)
        self.metrics.webhook_answered(status if counted else None)
        self.release(conn, quick_answer(status, text))

    def _sweep(self, now: float) -> None:
        super()._sweep(now)
        self.held_deadlines(now)
        self.admin.throttle.tick()

    def server_close(self) -> None:
        super().server_close()
        self.queue_watch.stop()
        self.admin.stop()


class WebhookService:
    """The listener and its writer thread, started and stopped together: one loop of the supervisor.

    ``on_commit`` hears of every commit that stored events (the supervisor wakes its workers);
    ``runtime`` returns the supervisor's health, which /metrics shows beside the listener's own.
    """

    name = "listener"

    def __init__(
        self,
        store: Store,
        config: ServerConfig,
        *,
        on_commit: Callable[[int], None] | None = None,
        runtime: Callable[[], dict] | None = None,
        logger: logging.Logger | None = None,
    ):
        self.store = store
        self.config = config
        self.on_commit = on_commit
        self.runtime = runtime
        self.log = logger or log
        self.committer: GroupCommitter | None = None
        self.httpd: WebhookHTTPServer | None = None
        self._serve_thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self.httpd is not None
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> WebhookService:
        """Bind and serve in the background; ``OSError``: cannot listen."""
        self.committer = GroupCommitter(self.store, on_commit=self.on_commit).start()
        try:
            self.httpd = WebhookHTTPServer(self.config, self.store, self.committer, runtime=self.runtime)
        except BaseException:
            self.committer.stop(1.0)
            raise
        self._serve_thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="amohook-listener", daemon=True
        )
        self._serve_thread.start()
        return self

    def run(self, stop: threading.Event) -> None:
        """As a loop of the supervisor: serve until ``stop``, then stop within its deadline. The
        supervisor starts it first (to report a port in use at once); a restart after a death
        starts it again here."""
        if self._serve_thread is None or not self._serve_thread.is_alive():
            self.start()
        try:
            while not stop.wait(0.5):
                if self._serve_thread is None or not self._serve_thread.is_alive():
                    raise RuntimeError("the listener's event loop ended")
        finally:
            self.stop(remaining(stop))

    def health(self) -> dict:
        if self.committer is None or self.httpd is None:
            return {"listening": False}
        commits = self.committer.health()
        return {
            "listening": self._serve_thread is not None and self._serve_thread.is_alive(),
            "connections": self.httpd.open_connections(),
            "writer_queue": self.committer.queued(),
            "commits_failing": commits.failing,
        }

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stop accepting, answer what was read, commit it; within ``timeout``."""
        deadline = time.monotonic() + timeout
        if self.httpd is not None:
            self.httpd.shutdown()  # the accept loop ends
            self.httpd.socket.close()  # new connections are refused from now on
            if not self.httpd.wait_idle(max(0.0, min(self.config.stop_grace, deadline - time.monotonic()))):
                self.log.warning("stopping with %d connections still open", self.httpd.open_connections())
            self.httpd.server_close()
        if self.committer is not None:
            self.committer.stop(max(0.1, min(3.0, deadline - time.monotonic())))
