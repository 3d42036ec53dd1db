"""The listener in-process over real sockets: starting it, requests, raw bytes, timed webhooks."""

from __future__ import annotations

import http.client
import socket
import time

from amohook.webhooks.server import ServerConfig, WebhookService
from tests.helpers.deliveries import FORM, lead_body

SECRET = "test-secret-0123456789"
HOOK = f"/webhook/{SECRET}"


def start(store, **config) -> WebhookService:
    config.setdefault("socket_timeout", 2.0)
    config.setdefault("read_deadline", 4.0)
    return WebhookService(store, ServerConfig(secret=SECRET, port=0, **config)).start()


def request(svc, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection(*svc.address, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def post(svc, body: bytes, path: str = HOOK, content_type: str | None = FORM):
    return request(svc, "POST", path, body, {"Content-Type": content_type} if content_type else {})


def raw(svc, data: bytes, *, pause: float = 0.0, rest: bytes = b"", timeout: float = 10.0) -> bytes:
    """Send bytes as they are; read the whole answer."""
    with socket.create_connection(svc.address, timeout=timeout) as sock:
        sock.sendall(data)
        if pause:
            time.sleep(pause)
        if rest:
            sock.sendall(rest)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def webhook_bytes(n: int) -> bytes:
    body = lead_body(n)
    return (
        f"POST {HOOK} HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


def timed_post(address, n: int) -> tuple[int, float]:
    started = time.monotonic()
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(webhook_bytes(n))
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return status_of(answer), time.monotonic() - started
