"""An HTTP request to somebody else's server that ends when its time is up, whatever they do.

requests' timeouts bound each wait for a byte, not the whole exchange: a receiver that answers
one byte every few seconds — the status line, a header, the body — keeps a request going for
as long as it likes. Inside ``deadline(seconds)``, every socket a session prepared with
``with_deadline`` opens or reuses in this thread is watched, and when the time is up it is shut
down: the request then fails at once (a ``requests.ConnectionError`` or the like) and the caller
handles it as any dropped connection. The watch ends with the block.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import requests
from requests.adapters import HTTPAdapter

_current = threading.local()


class Deadline:
    """Shuts the sockets it watches once ``seconds`` have passed (``expired`` says whether it did).

    It keeps a duplicate of each socket's descriptor: shutdown acts on the connection, not on one
    descriptor, and the duplicate stays valid when TLS takes the original over (``wrap_socket``
    detaches it) — the deadline then covers the handshake too.
    """

    def __init__(self, seconds: float):
        self._lock = threading.Lock()
        self._watched: list[socket.socket] = []
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            for dup in self._watched:
                dup.close()  # the duplicate only: the connection stays the library's
            self._watched.clear()

    def watch(self, sock: socket.socket) -> None:
        try:
            dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
        except OSError:
            return
        with self._lock:
            self._watched.append(dup)
            if self.expired:
                _shut(dup)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for dup in self._watched:
                _shut(dup)


def _shut(sock: socket.socket) -> None:
    # The reader blocked in recv() in the other thread gets end-of-file at once; closing is left
    # to the library that owns the connection.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _watch(sock: Any) -> None:
    current = getattr(_current, "deadline", None)
    if current is not None and isinstance(sock, socket.socket):
        current.watch(sock)


@contextmanager
def deadline(seconds: float) -> Iterator[Deadline]:
    """Within the block, this thread's requests on a ``with_deadline`` session end by ``seconds``."""
    watch = Deadline(seconds)
    previous = getattr(_current, "deadline", None)
    _current.deadline = watch
    watch.start()
    try:
        yield watch
    finally:
        watch.cancel()
        _current.deadline = previous


@cache
def _watched_pool(pool_cls: type) -> type:
    """``pool_cls`` whose connections report their socket: when made, and when used again."""
    base: Any = getattr(pool_cls, "ConnectionCls")  # noqa: B009 — a class attribute mypy cannot see on `type`

    class Connection(base):
        def _new_conn(self):
            sock = super()._new_conn()
            _watch(sock)
            return sock

        def request(self, *args, **kwargs):
            if getattr(self, "sock", None) is not None:  # a kept-alive connection, used again
                _watch(self.sock)
            return super().request(*args, **kwargs)

    return type(pool_cls.__name__, (pool_cls,), {"ConnectionCls": Connection})


def _watch_manager(manager: Any) -> Any:
    manager.pool_classes_by_scheme = {
        scheme: _watched_pool(cls) for scheme, cls in dict(manager.pool_classes_by_scheme).items()
    }
    return manager


class _DeadlineAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        _watch_manager(self.poolmanager)

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        return _watch_manager(super().proxy_manager_for(proxy, **proxy_kwargs))


def with_deadline(session: requests.Session | None = None) -> requests.Session:
    """``session`` (or a new one) whose http and https requests obey ``deadline``."""
    session = session or requests.Session()
    session.mount("http://", _DeadlineAdapter())
    session.mount("https://", _DeadlineAdapter())
    return session
