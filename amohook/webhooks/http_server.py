"""The hardened HTTP server under the webhook listener: no routes and nothing amoCRM-specific.

One event-loop thread holds every connection until its request head has arrived; then it
answers the request itself (what the subclass can decide from the request line: a wrong path, a
wrong method) or hands it to a bounded pool of threads that is reused, where requests the
subclass does not vouch for may take only a few threads (``HardenedHTTPServer``). Heads and bodies
are bounded in size and time (the silence and whole-request deadlines, the reaper), connections
are capped below the open-file limit, every answer is one write that closes the connection
(``HardenedRequestHandler``), and the lingering after a refused body is done by the event loop,
never by a thread. ``webhooks/server.py`` adds the routes and the service around it.
"""

from __future__ import annotations

import collections
import errno
import io
import logging
import queue
import re
import resource
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import NamedTuple

# The listener's logger, as before this module was cut out of server.py: one name for its lines.
log = logging.getLogger("amohook.server")

LINGER_BYTES = 256 * 1024  # read at most this much of a refused body, so the client sees our answer
LINGER_SECONDS = 0.5  # ... for at most this long (in the event loop: lingering takes no thread)
HEAD_LINE_LIMIT = 8 * 1024  # request line or one header line; longer: 414 / 431
HEAD_LIMIT = 16 * 1024  # the whole header block; larger: 431
FD_RESERVE = 64  # open files kept free for the database, the log and the store's WAL
FD_LOG_SECONDS = 10.0  # "out of open files" is logged at most this often
ACCEPT_PAUSE = 0.1  # when out of open files with nothing to evict, accepting waits this long


# What ``HardenedHTTPServer.route_head`` may decide for a complete request head:
TRUSTED = "trusted"  # the head proves the client holds the secret (a real delivery): any thread
UNTRUSTED = "untrusted"  # anything else that needs a thread: at most ``max_untrusted`` at once


class Answer(NamedTuple):
    """... or an answer the event loop sends itself, without a thread."""

    status: int
    text: str
    headers: tuple[tuple[str, str], ...] = ()


_PHRASES = {status.value: status.phrase for status in HTTPStatus}
_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header's value (RFC 9110 IMF-fixdate), formatted once per second."""
    global _date_cache
    now = int(time.time())
    cached = _date_cache
    if cached[0] != now:
        cached = _date_cache = (now, formatdate(now, usegmt=True))
    return cached[1]


class HardenedRequestHandler(BaseHTTPRequestHandler):
    """A request whose head the event loop has read: the body is read with the server's silence
    and whole-request deadlines, every answer is one write and closes the connection, and a
    refused body is lingered over (by the event loop, once the thread is done) so the client sees
    the answer. Subclasses add the routes (``do_GET`` …) and the logging (``log_request``,
    ``log_message``: only they know what in a request target is secret)."""

    # HTTP/1.1 so that "Expect: 100-continue" (PHP's curl sends it for bodies over 1 KiB) is
    # answered at once instead of the client waiting a second for it; every answer closes the
    # connection, as amoCRM's requests do (docs/amocrm.md §5).
    protocol_version = "HTTP/1.1"
    allow = "GET, HEAD, POST"  # the Allow header of a 405 to an unknown method
    server: HardenedHTTPServer

    def version_string(self) -> str:
        return "amohook"

    # -- connection lifecycle -----------------------------------------------------------------
    def setup(self) -> None:
        # ``request`` is a Conn whose head the event loop has already read into ``buf``.
        conn: Conn = self.request
        self.connection = conn.sock
        self.connection.settimeout(self.server.config.socket_timeout)
        self.rfile = io.BufferedReader(PrefixedReader(conn.buf, conn.sock))
        self.wfile = socketserver._SocketWriter(conn.sock)  # type: ignore[attr-defined]  # stdlib, not in typeshed
        self.responded = False
        self.expired = False
        self.body_read = False
        self.command = ""
        self.path = ""
        self.request_version = "HTTP/1.1"
        self.requestline = ""
        self.server.track(self, conn.accepted + self.server.config.read_deadline)

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
                    self.reply(408, "request not received in time\n")
                return
            if not self.parse_request():
                return
            if self.command not in ("POST", "PUT", "PATCH"):
                self.server.reading_done(self)  # no body to wait for: the deadline no longer applies
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.reply(405, "method not allowed\n", headers=(("Allow", self.allow),))
                return
            method()
            self.wfile.flush()
        except TimeoutError:
            self.close_connection = True
            self.reply_quietly(408, "request not received in time\n")
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True

    # -- answers ------------------------------------------------------------------------------
    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors found by the standard library (bad request line, 414, 431): plain text."""
        if self.request_version == "HTTP/0.9" or not self.request_version:
            self.request_version = "HTTP/1.1"  # nobody speaks 0.9; answer with a status line
        if self.expired:
            code, message = 408, "request not received in time"
        phrase = message or HTTPStatus(code).phrase
        self.reply(code, f"{code} {phrase[:200]}\n")

    def reply(self, status: int, text: str, content_type: str = "text/plain; charset=utf-8", headers=()) -> None:
        """Answer and close: status line, headers and body in one write."""
        if self.responded:
            return
        self.responded = True
        self.close_connection = True
        if self.expired:  # the reaper cut the read short: whatever was missing, the cause is time
            status, text, content_type, headers = 408, "request not received in time\n", "text/plain; charset=utf-8", ()
        self.status_sent = status  # what the routes' counters (/metrics) report
        body = text.encode("utf-8")
        self.log_request(status)
        # The status line, headers and body in one write (one send, one segment): what
        # send_response/send_header/end_headers would produce, without their per-line work.
        head = "".join(
            [
                f"{self.protocol_version} {status} {_PHRASES.get(status) or HTTPStatus(status).phrase}\r\n"
                f"Server: amohook\r\nDate: {http_date()}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n",
                *[f"{name}: {value}\r\n" for name, value in headers],
                "\r\n",
            ]
        ).encode("latin-1", "strict")
        self.wfile.write(head if self.command == "HEAD" else head + body)
        if not self.body_read and self.command in ("POST", "PUT", "PATCH"):
            # The body may still be coming: the event loop reads and drops it once this thread
            # is done (a thread lingering here let 128 refusals a second hold all 64 threads).
            self.request.linger = True

    def reply_quietly(self, status: int, text: str) -> None:
        try:
            self.reply(status, text)
        except OSError:
            pass


class Reaper(threading.Thread):
    """Ends the reading of request bodies still arriving ``read_deadline`` after the connection.

    The socket timeout only bounds each silence; a client sending a byte every few seconds would
    hold a thread forever. Shutting the read side makes the blocked read return at once, and the
    request is answered 408. (Request heads are read by the event loop, which has its own clock.)
    """

    def __init__(self):
        super().__init__(name="amohook-reaper", daemon=True)
        self._watch: dict[HardenedRequestHandler, float] = {}
        self._lock = threading.Lock()
        self._halt = threading.Event()  # not _stop: Thread uses that name itself

    def watch(self, handler: HardenedRequestHandler, until: float) -> None:
        with self._lock:
            self._watch[handler] = until

    def forget(self, handler: HardenedRequestHandler) -> None:
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


class PrefixedReader(io.RawIOBase):
    """What the event loop already read (the head, often the whole request), then the socket."""

    def __init__(self, prefix: bytes, sock: socket.socket):
        self._prefix = memoryview(prefix)
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._sock.recv_into(buffer)


_HEAD, _LINGER = 0, 1


class Conn:
    """A connection held by the event loop (reading its head, or lingering after an answer) or
    handed to a thread."""

    __slots__ = (
        "sock",
        "addr",
        "buf",
        "accepted",
        "last",
        "checked",
        "state",
        "until",
        "left",
        "watched",
        "trusted",
        "linger",
    )

    def __init__(self, sock: socket.socket, addr, now: float):
        self.sock = sock
        self.addr = addr
        self.buf = b""
        self.accepted = now
        self.last = now  # when bytes last arrived
        self.checked = 0  # the head is checked for over-long lines up to here
        self.state = _HEAD
        self.until = 0.0  # lingering: until when
        self.left = 0  # lingering: bytes still to be read and dropped
        self.watched = False  # registered with the selector
        self.trusted = False  # handed to a thread as TRUSTED (else it counts against max_untrusted)
        self.linger = False  # the thread answered without reading the body: the loop lingers


def head_end(buf: bytes, start: int) -> int:
    """The offset just past the blank line that ends the head, or -1 (a bare LF is accepted, as
    ``http.client`` parsing accepts it)."""
    i = buf.find(b"\n", start)
    while i != -1:
        if buf.startswith(b"\n", i + 1):
            return i + 2
        if buf.startswith(b"\r\n", i + 1):
            return i + 3
        i = buf.find(b"\n", i + 1)
    return -1


def quick_answer(
    status: int, text: str, headers: tuple[tuple[str, str], ...] = (), *, head_only: bool = False
) -> bytes:
    """A whole plain-text answer, for the event loop (no handler, no thread): the bytes
    ``HardenedRequestHandler.reply`` would send."""
    body = text.encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    head = (
        f"HTTP/1.1 {status} {_PHRASES[status]}\r\nServer: amohook\r\nDate: {http_date()}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        f"{extra}\r\n"
    ).encode("latin-1", "strict")
    return head if head_only else head + body


def request_line(buf: bytes) -> tuple[str, str] | None:
    """(method, target) of a complete head whose request line is ``METHOD target HTTP/1.0|1.1``,
    read as ``http.server`` reads them (Latin-1, split on whitespace, a leading ``//`` folded);
    None for anything else, which a thread's ``http.server`` parser then answers."""
    end = buf.find(b"\n")
    words = buf[: end if end != -1 else len(buf)].decode("latin-1").rstrip("\r\n").split()
    if len(words) != 3 or words[2] not in ("HTTP/1.0", "HTTP/1.1"):
        return None
    method, target = words[0], words[1]
    if target.startswith("//"):
        target = "/" + target.lstrip("/")
    return method, target


# A header field as ``http.client.parse_headers`` reads it exactly so: a token name, a colon, and a
# value of printable ASCII and tabs (the value starts after the spaces and tabs following the
# colon; trailing ones are kept, as the email parser keeps them).
_PLAIN_FIELD = rb"([!-9;-~]+):[\t ]*([\t -~]*)\r?\n"
_PLAIN_FIELDS = re.compile(rb"(?:[!-9;-~]+:[\t -~]*\r?\n){0,90}\r?\n")
_FIELD_LINE = re.compile(_PLAIN_FIELD)


def plain_headers(head: bytes) -> list[tuple[str, str]] | None:
    """The header fields of a complete head, as ``http.server`` would read them (its
    ``headers.items()``), when every line is a plain ``Name: value`` of printable ASCII; None for
    anything else (folded lines, other bytes, more than 90 fields), which a thread then parses."""
    start = head.find(b"\n") + 1
    if _PLAIN_FIELDS.fullmatch(head, start) is None:
        return None
    return [(name.decode("ascii"), value.decode("ascii")) for name, value in _FIELD_LINE.findall(head, start)]


def nofile_limit() -> int:
    """The soft limit of open files of this process."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 1024
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class HardenedHTTPServer(HTTPServer):
    """One event-loop thread holds every connection until its request head has arrived; then it
    answers what ``route_head`` can decide from the request line itself, and only the rest takes
    one of ``max_workers`` threads, which reads the body and answers.

    A thread per connection let anyone hold a thread (and its memory) per idle or trickling
    connection: 2,000 idle connections were 2,005 threads, and at the open-file limit the accept
    loop spun on EMFILE while real webhooks waited. Here an idle connection costs a socket and a
    few hundred bytes; the number held is capped below the open-file limit, and when the cap (or
    EMFILE) is reached the oldest connection that has not sent its head is closed to make room,
    so a real webhook — whose head arrives at once — always gets in. Heads are bounded
    (``HEAD_LIMIT``, ``HEAD_LINE_LIMIT``), and the silence and whole-request deadlines apply
    from the first byte.

    Threads are for real deliveries first: requests ``route_head`` does not call ``TRUSTED`` take
    at most ``max_untrusted`` of them at once and wait in a line of their own for that share (at
    most ``max_queued``; more get 503 at once), so no flood of them delays a real delivery. No
    thread ever lingers over an unread body — the loop does, with a deadline and a byte bound.
    Before, a refused ``POST`` announcing a body it never sent kept its thread 0.5 s, so 128 such
    requests a second, from anyone, held all 64 threads and real webhooks missed amoCRM's 2 s.
    """

    allow_reuse_address = True

    def __init__(self, config, handler_class: type[HardenedRequestHandler]):
        """``config`` has host, port, backlog, socket_timeout, read_deadline, max_workers,
        max_untrusted, max_connections and max_queued (``webhooks.server.ServerConfig``); binds at
        once."""
        self.config = config
        self.request_queue_size = config.backlog
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        self.max_connections = max(16, min(config.max_connections, nofile_limit() - FD_RESERVE))
        self._reaper = Reaper()
        self._conns: dict[int, Conn] = {}  # fd -> connection, oldest first (event loop only)
        self._lingering: dict[int, Conn] = {}  # those of them lingering, oldest first
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._busy = 0  # connections handed to threads (queued or being handled)
        self._untrusted = 0  # UNTRUSTED connections queued for a thread or handled (<= max_untrusted)
        self._waiting: collections.deque[Conn] = collections.deque()  # UNTRUSTED, waiting for that share
        self._cond = threading.Condition()
        self._returned: collections.deque[Conn] = collections.deque()  # threads done: the loop lingers
        self._looping = False  # the loop takes returned connections and calls (under _cond)
        self._held = 0  # connections a subclass took in the loop (``take``) and has not answered yet
        self._calls: list[tuple[Callable[..., None], tuple]] = []  # for the loop to run (``in_loop``)
        self._woken = False  # the loop was woken for ``_calls`` and has not taken them yet
        self._halt = False
        self._loop_done = threading.Event()
        self._loop_done.set()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._paused_until = 0.0
        self._fd_logged_at = -FD_LOG_SECONDS
        self._shed = 0  # connections closed to make room, or turned away (503)
        self._refused = 0  # request heads refused by the loop (408, 414, 431, 503)
        self._reported = (0, 0, time.monotonic())
        super().__init__((config.host, config.port), handler_class)
        self.socket.setblocking(False)
        self._reaper.start()

    # -- the event loop ---------------------------------------------------------------------------
    def serve_forever(self, poll_interval: float = 0.25) -> None:
        self._loop_done.clear()
        sel = selectors.DefaultSelector()
        self._sel = sel
        with self._cond:
            self._looping = True
        try:
            sel.register(self.socket, selectors.EVENT_READ, None)
            sel.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
            listening = True
            next_sweep = time.monotonic() + 0.25
            while not self._halt:
                for key, _ in sel.select(0.25):
                    if key.data is None:
                        if not self._accept():
                            sel.unregister(self.socket)
                            listening = False
                    elif key.data is self._wake_r:
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    else:
                        self._readable(key.data)
                if self._calls:
                    self._run_calls()
                now = time.monotonic()
                while self._returned:
                    self._linger_returned(self._returned.popleft(), now)
                if not listening and now >= self._paused_until and not self._halt:
                    sel.register(self.socket, selectors.EVENT_READ, None)
                    listening = True
                if now >= next_sweep:
                    next_sweep = now + 0.25
                    self._sweep(now)
        finally:
            with self._cond:
                self._looping = False
            self._run_calls()  # from now on ``in_loop`` runs them in the calling thread
            for conn in [*self._conns.values(), *self._returned]:
                self._close(conn)  # no complete request from these, or already answered
            self._returned.clear()
            sel.close()
            self._loop_done.set()

    def shutdown(self) -> None:
        """End the event loop (connections still sending their head are closed)."""
        self._halt = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._loop_done.wait()

    def _accept(self) -> bool:
        """Accept what is waiting (a bounded number); False: pause accepting for a moment."""
        for _ in range(64):
            try:
                sock, addr = self.socket.accept()
            except BlockingIOError:
                return True
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return self._out_of_files(exc)
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that client gave up before we took it
                log.warning("accept failed: %s", exc)
                self._paused_until = time.monotonic() + ACCEPT_PAUSE
                return False
            self._admit(sock, addr)
        return True

    def _out_of_files(self, exc: OSError) -> bool:
        """EMFILE/ENFILE: make room by closing the oldest connections that sent no head; with none
        to close, stop accepting for ``ACCEPT_PAUSE`` instead of retrying in a tight loop."""
        now = time.monotonic()
        held = self.open_connections()
        # Something else holds files too: hold fewer connections from now on, so that the writer
        # (which may need to reopen the database) and the log still find a free descriptor.
        self.max_connections = max(16, min(self.max_connections, held - 32))
        if now - self._fd_logged_at >= FD_LOG_SECONDS:
            self._fd_logged_at = now
            log.warning(
                "out of open files (%s) with %d connections open (open-file limit %d): holding at most %d from now "
                "on, closing the oldest that sent no request; raise the limit (ulimit -n, or LimitNOFILE= in the "
                "systemd unit)",
                errno.errorcode.get(exc.errno or -1, exc.errno),
                held,
                nofile_limit(),
                self.max_connections,
            )
        if self._evict(max(8, len(self._conns) - self.max_connections)):
            return True
        self._paused_until = now + ACCEPT_PAUSE
        return False

    def _evict(self, count: int) -> int:
        """Close ``count`` connections, oldest first: those lingering after their answer (they
        have it), then those that have not sent a whole head (with a 503)."""
        evicted = 0
        while evicted < count and self._lingering:
            self._close(next(iter(self._lingering.values())))
            evicted += 1
        shed = 0
        for conn in list(self._conns.values()):
            if evicted >= count:
                break
            if conn.state == _HEAD:
                self._send_quietly(conn, quick_answer(503, "too many connections; retry later\n"))
                self._close(conn)
                evicted += 1
                shed += 1
        self._shed += shed
        return evicted

    def _admit(self, sock: socket.socket, addr) -> None:
        now = time.monotonic()
        if len(self._conns) >= self.max_connections and not self._evict(1):
            try:
                sock.setblocking(False)
                sock.send(quick_answer(503, "too many connections; retry later\n"))
            except OSError:
                pass
            sock.close()
            self._shed += 1
            return
        sock.setblocking(False)
        conn = Conn(sock, addr, now)
        fd = sock.fileno()
        self._conns[fd] = conn
        # The head usually arrives with the connection: read it now, without a trip through epoll.
        self._read_head(conn, now)

    def _readable(self, conn: Conn) -> None:
        now = time.monotonic()
        if conn.state == _LINGER:
            try:
                chunk = conn.sock.recv(min(65536, max(1, conn.left)))
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            conn.left -= len(chunk)
            if not chunk or conn.left <= 0:
                self._close(conn)
            return
        self._read_head(conn, now)

    def _read_head(self, conn: Conn, now: float) -> None:
        """Read what has arrived; refuse, hand over, or wait for more."""
        try:
            chunk = conn.sock.recv(HEAD_LIMIT + 1 - len(conn.buf))
        except BlockingIOError:
            self._watch(conn)
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(conn)  # the client went away before sending a whole head
            return
        start = max(0, len(conn.buf) - 2)
        conn.buf += chunk
        conn.last = now
        end = head_end(conn.buf, start)
        head_len = end if end != -1 else len(conn.buf)
        refusal = self._check_head(conn, head_len, complete=end != -1)
        if refusal is not None:
            self._refuse(conn, *refusal)
        elif end == -1:
            self._watch(conn)
        else:
            self._dispatch(conn)

    def _check_head(self, conn: Conn, head_len: int, complete: bool) -> tuple[int, str] | None:
        buf = conn.buf
        pos = conn.checked
        while True:
            nl = buf.find(b"\n", pos, head_len)
            line_end = nl if nl != -1 else head_len
            if line_end - pos > HEAD_LINE_LIMIT:
                if pos == 0:
                    return 414, f"request line longer than {HEAD_LINE_LIMIT} bytes\n"
                return 431, f"request header line longer than {HEAD_LINE_LIMIT} bytes\n"
            if nl == -1:
                break
            pos = nl + 1
        conn.checked = pos
        if head_len > HEAD_LIMIT:
            return 431, f"request header block larger than {HEAD_LIMIT} bytes\n"
        return None

    def _refuse(self, conn: Conn, status: int, text: str) -> None:
        """Answer from the loop without reading on, then drop (a bounded part of) what is still
        coming, so the client sees the answer instead of a reset."""
        # DEBUG: a flood would otherwise write a line per connection; ``_sweep`` sums them up.
        log.debug("%s %s (request head refused: %s)", conn.addr[0] if conn.addr else "?", status, text.strip())
        self._refused += 1
        self._answer(conn, quick_answer(status, text))

    def _answer(self, conn: Conn, data: bytes) -> None:
        """Send a whole answer from the loop, then linger: send FIN and drop (a bounded part of)
        what the client is still sending, so closing does not reset the connection before the
        client has read the answer."""
        if not self._send_quietly(conn, data):
            self._close(conn)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        self._linger(conn, time.monotonic())

    def _linger(self, conn: Conn, now: float) -> None:
        self._lingering[conn.sock.fileno()] = conn
        conn.state = _LINGER
        conn.until = now + LINGER_SECONDS
        conn.left = LINGER_BYTES
        self._watch(conn)

    def _send_quietly(self, conn: Conn, data: bytes) -> bool:
        try:
            conn.sock.send(data)  # a few hundred bytes into an empty send buffer
            return True
        except OSError:
            return False

    def _sweep(self, now: float) -> None:
        """Deadlines of connections still in the loop: silence, the whole request, lingering."""
        silence, deadline = self.config.socket_timeout, self.config.read_deadline
        shed, refused, since = self._reported
        if now - since >= FD_LOG_SECONDS * 6 and (self._shed, self._refused) != (shed, refused):
            log.warning(
                "in the last %.0f s: %d connections closed or turned away to stay under %d open, %d request heads "
                "refused (too slow, too large); %d connections open now",
                now - since,
                self._shed - shed,
                self.max_connections,
                self._refused - refused,
                self.open_connections(),
            )
            self._reported = (self._shed, self._refused, now)
        elif now - since >= FD_LOG_SECONDS * 6:
            self._reported = (shed, refused, now)
        for conn in list(self._conns.values()):
            if conn.state == _LINGER:
                if now >= conn.until:
                    self._close(conn)
            elif now - conn.last > silence or now - conn.accepted > deadline:
                if conn.buf.strip():
                    self._refuse(conn, 408, "request not received in time\n")
                else:
                    self._send_quietly(conn, quick_answer(408, "request not received in time\n"))
                    self._close(conn)

    def _watch(self, conn: Conn) -> None:
        if not conn.watched:
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)
            conn.watched = True

    def _unwatch(self, conn: Conn) -> None:
        if conn.watched:
            self._sel.unregister(conn.sock)
            conn.watched = False

    def _forget(self, conn: Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        self._lingering.pop(conn.sock.fileno(), None)

    def _close(self, conn: Conn) -> None:
        if conn.sock.fileno() != -1:
            self._unwatch(conn)
            self._forget(conn)
        conn.sock.close()

    # -- the threads ------------------------------------------------------------------------------
    def route_head(self, method: str, target: str, client_ip: str) -> Answer | str:
        """What to do with a complete head whose request line is well formed: an ``Answer`` the
        event loop sends at once (the subclass logs and counts it), ``TRUSTED`` (any thread) or
        ``UNTRUSTED`` (at most ``max_untrusted`` threads). Runs in the event loop: it must be quick,
        never block, and never raise. Here: every request takes any thread."""
        return TRUSTED

    def _decide(self, conn: Conn) -> tuple[Answer | str, str, str]:
        """(``route_head``'s decision, the method, the target)."""
        line = request_line(conn.buf)
        if line is None:
            return UNTRUSTED, "", ""  # for http.server's parser to refuse, in a thread
        try:
            return self.route_head(line[0], line[1], conn.addr[0] if conn.addr else "?"), line[0], line[1]
        except Exception:
            self.handle_error(conn, conn.addr)
            return UNTRUSTED, line[0], line[1]

    def take(self, conn: Conn, method: str, target: str) -> bool:
        """A ``TRUSTED`` request, head in ``conn.buf`` (often with the whole body): True if the
        subclass handles it in the loop, without a thread (``hold``, then ``release`` from any
        thread). Runs in the event loop: quick, never blocking, never raising. Here: never."""
        return False

    def hold(self, conn: Conn) -> bool:
        """Take ``conn`` out of the loop's care until ``release``; False: too many are held or
        handed to threads already (the thread hand-off then refuses it, as for any request)."""
        if self._held + self._busy >= self.config.max_workers + self.config.max_queued:
            return False
        self._unwatch(conn)
        self._forget(conn)
        with self._cond:
            self._held += 1
        return True

    def release(self, conn: Conn, answer: bytes) -> None:
        """Send the whole answer to a held connection and close it, as a thread's answer to a
        request whose body it read would (any thread)."""
        try:
            conn.sock.send(answer)  # a few hundred bytes into an empty send buffer
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.sock.close()
        with self._cond:
            self._held -= 1
            self._cond.notify_all()

    def in_loop(self, call: Callable[..., None], *args) -> None:
        """Run ``call(*args)`` in the event loop (soon), or here and now when the loop has ended.

        One wake-up of the loop however many calls arrive before it runs them (a batch of commits)."""
        with self._cond:
            queued = self._looping
            if queued:
                self._calls.append((call, args))
                wake, self._woken = not self._woken, True
        if not queued:
            call(*args)
        elif wake:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass  # the wake-up pipe is full: the loop is awake already

    def _run_calls(self) -> None:
        with self._cond:
            calls, self._calls, self._woken = self._calls, [], False
        for call, args in calls:
            try:
                call(*args)
            except Exception:
                self.handle_error(None, None)

    def held_deadlines(self, now: float) -> None:
        """Held connections whose time is up (the subclass answers them): run by the loop's sweep,
        and while ``wait_idle`` waits after the loop has ended."""

    def _dispatch(self, conn: Conn) -> None:
        """The head is complete: answer it here, or hand the connection to a thread (one more if
        all are busy)."""
        decision, method, target = self._decide(conn)
        if isinstance(decision, Answer):
            answer = quick_answer(decision.status, decision.text, decision.headers, head_only=method == "HEAD")
            self._answer(conn, answer)
            return
        if decision == TRUSTED and self.take(conn, method, target):
            return
        self._unwatch(conn)
        self._forget(conn)
        conn.trusted = trusted = decision == TRUSTED
        thread = None
        with self._cond:
            ready = self._busy - len(self._waiting)  # in the job queue or being handled
            if trusted:
                overloaded = ready - len(self._workers) >= self.config.max_queued
            else:
                overloaded = len(self._waiting) >= self.config.max_queued
            if not overloaded:
                self._busy += 1
                if not trusted and self._untrusted >= self.config.max_untrusted:
                    self._waiting.append(conn)  # until an UNTRUSTED one is done (``_work``)
                else:
                    if not trusted:
                        self._untrusted += 1
                    self._jobs.put(conn)
                    ready += 1
                if ready > len(self._workers) and len(self._workers) < self.config.max_workers:
                    thread = threading.Thread(target=self._work, name="amohook-conn", daemon=True)
                    self._workers.append(thread)
        if overloaded:
            self._shed += 1
            self._conns[conn.sock.fileno()] = conn
            self._refuse(conn, 503, "too many requests waiting; retry later\n")
            return
        if thread is not None:
            thread.start()

    def _work(self) -> None:
        while True:
            conn = self._jobs.get()
            if conn is None:
                return
            try:
                self.finish_request(conn, conn.addr)
            except Exception:
                self.handle_error(conn, conn.addr)
            finally:
                if conn.linger:
                    self._return(conn)
                else:
                    self.shutdown_request(conn.sock)
                with self._cond:
                    self._busy -= 1
                    if not conn.trusted and self._waiting:
                        self._jobs.put(self._waiting.popleft())  # its place passes to the next in line
                    elif not conn.trusted:
                        self._untrusted -= 1
                    self._cond.notify_all()

    def _return(self, conn: Conn) -> None:
        """A thread answered without reading the body: send FIN and give the connection back to
        the event loop, which lingers over it (``_linger_returned``)."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
        except OSError:
            conn.sock.close()
            return
        with self._cond:
            taken = self._looping
            if taken:
                self._returned.append(conn)
        if not taken:
            conn.sock.close()  # the loop has ended: nothing to linger for
            return
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # the wake-up pipe is full: the loop is awake already

    def _linger_returned(self, conn: Conn, now: float) -> None:
        if conn.sock.fileno() == -1:
            return
        conn.watched = False
        self._conns[conn.sock.fileno()] = conn
        self._linger(conn, now)

    def track(self, handler: HardenedRequestHandler, until: float) -> None:
        self._reaper.watch(handler, until)

    def untrack(self, handler: HardenedRequestHandler) -> None:
        self._reaper.forget(handler)

    def reading_done(self, handler: HardenedRequestHandler) -> None:
        self._reaper.forget(handler)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every request handed to a thread has been answered."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            self.held_deadlines(now)
            with self._cond:
                if self._busy <= 0 and self._held <= 0:
                    return True
                left = deadline - now
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.25))

    def open_connections(self) -> int:
        return len(self._conns) + self._busy + self._held + len(self._returned)

    def handle_error(self, request, client_address) -> None:
        log.error(
            "unhandled error with a connection from %s", client_address[0] if client_address else "?", exc_info=True
        )

    def server_close(self) -> None:
        super().server_close()
        self._reaper.stop()
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for conn in waiting:  # stopping: never handed to a thread
            conn.sock.close()
        for _ in self._workers:
            self._jobs.put(None)
        for sock in (self._wake_r, self._wake_w):
            sock.close()
