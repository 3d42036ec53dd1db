"""The webhook listener: receive, store durably, acknowledge — and nothing else.

amoCRM waits at most 2 seconds for a 2xx and switches a webhook off after more than 100 failed
answers in 2 hours (FACTS.md §5 "Response, retries, disabling"), so every request is answered
quickly and never with a traceback: a body that cannot be read gets its 4xx, a store that cannot
commit gets 503 (amoCRM retries), and 200 is sent only after the delivery and its events are
committed. Storing is handed to one writer thread that commits many requests per transaction
(``inbox.GroupCommitter``); processing happens later, in the worker.

Routes: ``POST /webhook/<secret>``, ``GET /healthz``, ``GET /oauth/callback``; anything else 404/405.
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence
from urllib.parse import parse_qs

from amohook import inbox
from amohook.errors import AmohookError, ConfigError
from amohook.inbox import GroupCommitter, Incoming, StoreUnavailable
from amohook.webhooks.parse import BodyRejected, parse_webhook

log = logging.getLogger("amohook.server")

MIN_SECRET_LENGTH = 16
_SECRET_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
LINGER_BYTES = 256 * 1024  # read at most this much of a refused body, so the client sees our answer
LINGER_SECONDS = 0.5
IDLE_THREAD_SECONDS = 5.0  # how long a connection thread waits for another connection before it ends


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
    backlog: int = 1024  # the default of 5 makes connections wait a second or more under a burst
    stop_grace: float = 3.0  # on stop, how long requests already being handled may take


def check_secret(secret: str | None) -> str:
    """The webhook secret goes in the URL path: long enough to be unguessable, URL-safe."""
    if not secret:
        raise ConfigError(
            "no webhook secret — set AMOHOOK_WEBHOOK_SECRET (or --secret) to a random string of at least "
            f"{MIN_SECRET_LENGTH} characters, e.g. the output of `python3 -c \"import secrets; print(secrets.token_urlsafe(24))\"`"
        )
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"the webhook secret is {len(secret)} characters; use at least {MIN_SECRET_LENGTH} "
            "(e.g. `python3 -c \"import secrets; print(secrets.token_urlsafe(24))\"`)"
        )
    if not set(secret) <= _SECRET_CHARS:
        raise ConfigError("the webhook secret goes into the URL: use only letters, digits and - . _ ~")
    return secret


_PHRASES = {status.value: status.phrase for status in HTTPStatus}
_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header's value (RFC 9110 IMF-fixdate), formatted once per second."""
    global _date_cache
    now = int(time.time())
    cached = _date_cache
    if cached[0] != now:
        cached = _date_cache = (now, formatdate(now, usegmt=True))
    return cached[1]


def _redact(path: str) -> str:
    return "/webhook/***" if path.startswith("/webhook/") else path.split("?", 1)[0][:200]


# The OAuth page: the address carries a one-time code, so keep it out of caches and other sites'
# logs (Cache-Control, Referrer-Policy); the page loads nothing, runs nothing and is never framed
# (its one inline style attribute is all the CSP allows).
_PAGE_HEADERS = (
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
                                "base-uri 'none'; form-action 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so that "Expect: 100-continue" (PHP's curl sends it for bodies over 1 KiB) is
    # answered at once instead of the client waiting a second for it; every answer closes the
    # connection, as amoCRM's requests do (FACTS.md §5).
    protocol_version = "HTTP/1.1"
    server: "WebhookHTTPServer"

    def version_string(self) -> str:
        return "amohook"

    # -- connection lifecycle -----------------------------------------------------------------
    def setup(self) -> None:
        self.timeout = self.server.config.socket_timeout
        self.responded = False
        self.expired = False
        self.body_read = False
        self.command = ""
        self.path = ""
        self.request_version = "HTTP/1.1"
        self.requestline = ""
        super().setup()
        self.server.track(self)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.untrack(self)

    def handle_one_request(self) -> None:
        """As the standard library's, but a timeout or a trickling client gets 408, and an
        unknown method 405 (not 501: no answer here may be a 5xx unless the server is at fault)."""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                if self.expired:
                    self._reply(408, "request not received in time\n")
                return
            if not self.parse_request():
                return
            if self.command not in ("POST", "PUT", "PATCH"):
                self.server.reading_done(self)  # no body to wait for: the deadline no longer applies
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self._reply(405, "method not allowed\n", headers=(("Allow", "GET, HEAD, POST"),))
                return
            method()
            self.wfile.flush()
        except TimeoutError:
            self.close_connection = True
            self._reply_quietly(408, "request not received in time\n")
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True

    def handle_expect_100(self) -> bool:
        # Invite the body only when it will be read; otherwise the final answer (404, 411, 413…)
        # goes out instead of "100 Continue", and the body is never sent.
        if self.command == "POST" and self._secret_ok(self.path.split("?", 1)[0]):
            length = self.headers.get("Content-Length", "").strip()
            if length.isdigit() and int(length) <= self.server.config.max_body:
                return super().handle_expect_100()
        return True

    # -- answers ------------------------------------------------------------------------------
    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors found by the standard library (bad request line, 414, 431): plain text."""
        if self.request_version == "HTTP/0.9" or not self.request_version:
            self.request_version = "HTTP/1.1"  # nobody speaks 0.9; answer with a status line
        if self.expired:
            code, message = 408, "request not received in time"
        phrase = message or HTTPStatus(code).phrase
        self._reply(code, f"{code} {phrase[:200]}\n")

    def _reply(self, status: int, text: str, content_type: str = "text/plain; charset=utf-8", headers=()) -> None:
        if self.responded:
            return
        self.responded = True
        self.close_connection = True
        if self.expired:  # the reaper cut the read short: whatever was missing, the cause is time
            status, text, content_type, headers = 408, "request not received in time\n", "text/plain; charset=utf-8", ()
        body = text.encode("utf-8")
        self.log_request(status)
        # The status line, headers and body in one write (one send, one segment): what
        # send_response/send_header/end_headers would produce, without their per-line work.
        head = "".join(
            [
                f"{self.protocol_version} {status} {_PHRASES.get(status) or HTTPStatus(status).phrase}\r\n"
                f"Server: amohook\r\nDate: {_http_date()}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n",
                *[f"{name}: {value}\r\n" for name, value in headers],
                "\r\n",
            ]
        ).encode("latin-1", "strict")
        self.wfile.write(head if self.command == "HEAD" else head + body)
        if not self.body_read and self.command in ("POST", "PUT", "PATCH"):
            self._linger()

    def _reply_quietly(self, status: int, text: str) -> None:
        try:
            self._reply(status, text)
        except OSError:
            pass

    def _linger(self) -> None:
        """After answering without reading the body: send FIN, then read (a bounded part of) what
        the client is still sending, so closing does not reset the connection before it reads."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            deadline = time.monotonic() + LINGER_SECONDS
            left = LINGER_BYTES
            while left > 0 and time.monotonic() < deadline:
                chunk = self.connection.recv(min(65536, left))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def log_request(self, code="-", size="-") -> None:
        if isinstance(code, HTTPStatus):
            code = code.value
        level = logging.DEBUG if code in (100, 200) else logging.INFO
        log.log(level, "%s %s %s %s", self.client_address[0], self.command, _redact(self.path), code)

    def log_message(self, format: str, *args) -> None:
        log.debug("%s " + format, self.client_address[0], *args)

    # -- routes -------------------------------------------------------------------------------
    def do_GET(self) -> None:
        try:
            self._route()
        except (ConnectionError, TimeoutError):
            raise
        except Exception:
            # A bug: the stack goes to the log, never into the answer.
            log.exception("unexpected error answering %s %s", self.command, _redact(self.path))
            self._reply_quietly(500, "internal error\n")

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _route(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/webhook" or path.startswith("/webhook/"):
            if self.command != "POST":
                return self._reply(405, "use POST\n", headers=(("Allow", "POST"),))
            return self._webhook(path)
        if path == "/healthz":
            if self.command not in ("GET", "HEAD"):
                return self._reply(405, "use GET\n", headers=(("Allow", "GET, HEAD"),))
            return self._healthz()
        if path == "/oauth/callback":
            if self.command not in ("GET", "HEAD"):
                return self._reply(405, "use GET\n", headers=(("Allow", "GET, HEAD"),))
            return self._oauth_callback()
        self._reply(404, "not found\n")

    def _secret_ok(self, path: str) -> bool:
        candidate = path[len("/webhook/"):].rstrip("/") if path.startswith("/webhook/") else ""
        # Constant time: the answer must not tell how much of a guessed secret was right.
        return hmac.compare_digest(candidate.encode("latin-1", "replace"), self.server.secret_bytes)

    def _webhook(self, path: str) -> None:
        if not self._secret_ok(path):
            return self._reply(404, "not found\n")
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
            return self._reply(exc.status, exc.reason + "\n")
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
            return self._reply(503, "cannot store the webhook now; retry later\n")
        self._reply(200, "ok\n" if stored.new else "ok (already stored)\n")

    def _content_length(self) -> int | None:
        if self.headers.get("Transfer-Encoding") is not None:
            self._reply(411, "send the body with Content-Length (chunked bodies are not accepted)\n")
            return None
        values = [v.strip() for v in self.headers.get_all("Content-Length") or []]
        if not values:
            self._reply(411, "Content-Length required\n")
            return None
        if len(set(values)) != 1 or not values[0].isascii() or not values[0].isdigit() or len(values[0]) > 15:
            self._reply(400, "invalid Content-Length\n")
            return None
        length = int(values[0])
        if length > self.server.config.max_body:
            self._reply(413, f"body larger than {self.server.config.max_body} bytes\n")
            return None
        return length

    def _read_body(self, length: int) -> bytes | None:
        try:
            body = self.rfile.read(length) if length else b""
        except TimeoutError:
            self._reply_quietly(408, "request body not received in time\n")
            return None
        finally:
            self.server.reading_done(self)
        self.body_read = True
        if len(body) < length:
            if self.expired:
                self._reply_quietly(408, "request body not received in time\n")
            else:
                self._reply_quietly(400, "body shorter than Content-Length\n")
            return None
        return body

    def _healthz(self) -> None:
        store = self.server.store
        try:
            stats = inbox.queue_stats(store, now=time.time())
            status = 200
            payload = {
                "status": "ok",
                "database": "ok",
                "queue_depth": stats.pending + stats.running,
                "pending": stats.pending,
                "due": stats.due,
                "running": stats.running,
                "dead": stats.dead,
                "oldest_pending_age": None if stats.oldest_pending_age is None else round(stats.oldest_pending_age, 3),
                "writer_queue": self.server.committer.queued(),
            }
        except Exception as exc:
            log.warning("healthz: the database is not usable: %s", inbox._describe(exc))
            status = 503
            payload = {
                "status": "error",
                "database": f"error: {inbox._describe(exc)}",
                "queue_depth": None,
                "pending": None,
                "due": None,
                "running": None,
                "dead": None,
                "oldest_pending_age": None,
                "writer_queue": self.server.committer.queued(),
            }
        finally:
            inbox._close_quietly(store)  # this thread's connection; request threads are short-lived
        self._reply(status, json.dumps(payload) + "\n", "application/json", headers=(("Cache-Control", "no-store"),))

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
            return self._page(400, "amoCRM reported an error", f"amoCRM redirected here with error “{error[:100]}”. "
                              "Run `amohook auth-url` to start again.")
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
                log.warning("oauth callback: the database is not usable: %s", inbox._describe(exc))
                return self._page(503, "Authorization failed", "The database is not available right now; "
                                  "nothing was stored. Run `amohook auth-url` again once it is back.")
            log.exception("oauth callback failed")
            return self._page(500, "Authorization failed", "An unexpected error; the amohook log has the details.")
        finally:
            inbox._close_quietly(store)
        self._page(
            200,
            "amohook is connected",
            f"The account “{account.subdomain}” is authorized and its tokens are stored. You can close this page; "
            "`amohook status` shows the tokens.",
        )

    def _page(self, status: int, title: str, message: str) -> None:
        page = (
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title></head>\n"
            "<body style=\"font-family: sans-serif; max-width: 40em; margin: 3em auto\">\n"
            "<h1>{t}</h1>\n<p>{m}</p>\n</body></html>\n"
        ).format(t=html.escape(title), m=html.escape(message))
        self._reply(
            status,
            page,
            "text/html; charset=utf-8",
            headers=_PAGE_HEADERS,
        )


class _Reaper(threading.Thread):
    """Ends the reading of requests that take longer than ``read_deadline`` in total.

    The socket timeout only bounds each silence; a client sending a byte every few seconds would
    hold a thread forever. Shutting the read side makes the blocked read return at once, and the
    request is answered 408.
    """

    def __init__(self, deadline: float):
        super().__init__(name="amohook-reaper", daemon=True)
        self.deadline = deadline
        self._watch: dict[_Handler, float] = {}
        self._lock = threading.Lock()
        self._halt = threading.Event()  # not _stop: Thread uses that name itself

    def watch(self, handler: _Handler) -> None:
        with self._lock:
            self._watch[handler] = time.monotonic() + self.deadline

    def forget(self, handler: _Handler) -> None:
        with self._lock:
            self._watch.pop(handler, None)

    def run(self) -> None:
        while not self._halt.wait(0.25):
            now = time.monotonic()
            with self._lock:
                late = [h for h, until in self._watch.items() if until < now]
                for handler in late:
                    del self._watch[handler]
            for handler in late:
                handler.expired = True
                try:
                    handler.connection.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    def stop(self) -> None:
        self._halt.set()


class WebhookHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # connections are counted here instead (stop waits for them)
    allow_reuse_address = True

    def __init__(self, config: ServerConfig, store, committer: GroupCommitter):
        self.config = config
        self.store = store
        self.committer = committer
        self.secret_bytes = check_secret(config.secret).encode("ascii")
        self.request_queue_size = config.backlog
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        self._reaper = _Reaper(config.read_deadline)
        self._open = 0
        self._cond = threading.Condition()
        self._idle: list[_Slot] = []  # connection threads waiting for their next connection
        self._idle_lock = threading.Lock()
        self._closing = False
        super().__init__((config.host, config.port), _Handler)
        self._reaper.start()

    # -- a thread per connection, reused ----------------------------------------------------------
    # As ThreadingMixIn, every connection gets a thread of its own at once (a slow client never
    # makes another wait), but a thread that has finished its connection waits a while for the
    # next one instead of exiting: starting a thread (clone, stack, the start handshake) was a
    # good part of what each request cost (bench/ack.py).
    def process_request(self, request, client_address) -> None:
        with self._idle_lock:
            slot = self._idle.pop() if self._idle else None
        if slot is None:
            thread = threading.Thread(
                target=self._connection_thread, args=((request, client_address),), name="amohook-conn", daemon=True
            )
            thread.start()
        else:
            slot.job = (request, client_address)
            slot.ready.release()

    def _connection_thread(self, job) -> None:
        slot = _Slot()
        while job is not None:
            request, client_address = job
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
            job = None
            with self._idle_lock:
                if self._closing:
                    return
                self._idle.append(slot)
            if not slot.ready.acquire(timeout=IDLE_THREAD_SECONDS):
                with self._idle_lock:
                    if slot in self._idle:  # nobody handed it a connection: end the thread
                        self._idle.remove(slot)
                        return
                slot.ready.acquire()  # a connection was handed over just now; it is on its way
            job, slot.job = slot.job, None

    def track(self, handler: _Handler) -> None:
        self._reaper.watch(handler)
        with self._cond:
            self._open += 1

    def untrack(self, handler: _Handler) -> None:
        self._reaper.forget(handler)
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def reading_done(self, handler: _Handler) -> None:
        self._reaper.forget(handler)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no connection is open (requests already read get their answer)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._open > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def open_connections(self) -> int:
        with self._cond:
            return self._open

    def handle_error(self, request, client_address) -> None:
        log.error("unhandled error with a connection from %s", client_address[0] if client_address else "?", exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        self._reaper.stop()
        with self._idle_lock:
            self._closing = True
            idle, self._idle = self._idle, []
        for slot in idle:
            slot.job = None
            slot.ready.release()


class _Slot:
    """An idle connection thread: ``ready`` is released when ``job`` is set (None: exit)."""

    __slots__ = ("ready", "job")

    def __init__(self):
        self.ready = threading.Lock()
        self.ready.acquire()
        self.job = None


class WebhookService:
    """The listener, its writer thread and (optionally) worker threads, started and stopped together."""

    def __init__(self, store, config: ServerConfig, *, workers: Sequence = (), logger: logging.Logger | None = None):
        self.store = store
        self.config = config
        self.workers = list(workers)
        self.log = logger or log
        self.committer: GroupCommitter | None = None
        self.httpd: WebhookHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._serve_thread: threading.Thread | None = None
        self._worker_stop = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        assert self.httpd is not None
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> "WebhookService":
        self.committer = GroupCommitter(self.store, on_commit=self._wake_workers).start()
        try:
            self.httpd = WebhookHTTPServer(self.config, self.store, self.committer)
        except BaseException:
            self.committer.stop(1.0)
            raise
        self._serve_thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="amohook-listener", daemon=True
        )
        self._serve_thread.start()
        for worker in self.workers:
            thread = threading.Thread(target=self._run_worker, args=(worker,), name=f"amohook-{worker.worker_id}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run_worker(self, worker) -> None:
        try:
            worker.run(self._worker_stop)
        except Exception:
            self.log.exception("worker %s stopped with an error", worker.worker_id)

    def _wake_workers(self, _count: int) -> None:
        for worker in self.workers:
            worker.wake()

    def stop(self, timeout: float = 9.0) -> None:
        """Stop accepting, answer what was read, commit it, release claimed events; within ``timeout``."""
        deadline = time.monotonic() + timeout
        self._worker_stop.set()
        for worker in self.workers:
            worker.stop()
        if self.httpd is not None:
            self.httpd.shutdown()  # the accept loop ends
            self.httpd.socket.close()  # new connections are refused from now on
            if not self.httpd.wait_idle(max(0.0, min(self.config.stop_grace, deadline - time.monotonic()))):
                self.log.warning("stopping with %d connections still open", self.httpd.open_connections())
            self.httpd.server_close()
        if self.committer is not None:
            self.committer.stop(max(0.1, min(3.0, deadline - time.monotonic())))
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        busy = [t.name for t in self._threads if t.is_alive()]
        if busy:
            self.log.warning("a handler is still running in %s; its event is retried after the lease", ", ".join(busy))
