"""The listener's log never shows the webhook secret, however near a request comes to the webhook
URL, and a request cannot forge log lines (hardening #3)."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time

import pytest

from amohook.store import open_store
from amohook.webhooks.server import ServerConfig, WebhookService
from tests.conftest import ROOT, cli_env

SECRET = "Near-miss_secret-0123456789"
ENCODED = "".join(f"%{ord(c):02X}" for c in SECRET)
TARGETS = [
    f"/amohook/webhook/{SECRET}",
    f"/webhooks/{SECRET}",
    f"/Webhook/{SECRET}",
    f"/WEBHOOK/{SECRET}/",
    f"/webhook%2F{SECRET}",
    f"/webhook%2f{SECRET}",
    f"/webhook%252F{SECRET}",
    f"/webhook/{ENCODED}",
    f"/{ENCODED}",
    f"/webhook{SECRET}",
    f"/hook/{SECRET}",
    f"/hook/{SECRET[:-2]}",
    f"/hook/{SECRET.lower()}",
    f"//webhook//{SECRET}",
    f"/webhook/{SECRET}x",
    f"http://hooks.example.com/webhook/{SECRET}",
    f"https://hooks.example.com:443/amohook/webhook/{SECRET}?a=1",
    f"/healthz?secret={SECRET}",
    f"/oauth/callback/{SECRET}",
]


def raw_requests(address) -> list[bytes]:
    """Every near miss as GET and POST, a request line the standard library refuses, an unknown
    method, and a path with terminal escapes and a forged line."""
    requests = []
    for target in TARGETS:
        requests.append(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        requests.append(
            f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: 3\r\n\r\na=1".encode()
        )
    requests += [
        f"GET /webhooks/{SECRET} extra HTTP/1.1\r\n\r\n".encode(),  # 400: bad request syntax
        f"GET /webhooks/{SECRET} HTTP/9.9\r\n\r\n".encode(),  # 505 / 400: bad version
        f"BREW /webhook/{SECRET} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),  # 405
        f"{SECRET} /x HTTP/1.1\r\nHost: x\r\n\r\n".encode(),  # the secret as the method
        b"GET /x\x1b[2J\x07\x7f\xc2\x9b HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /webhook/{SECRET}\rforged INFO line HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    ]
    return requests


def send(address, data: bytes) -> None:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass


def assert_clean(text: str) -> None:
    lowered = text.lower()
    for form in (SECRET, ENCODED, SECRET[:-2]):
        assert form.lower() not in lowered, f"{form!r} in the log:\n{text}"
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text


def test_near_misses_are_logged_without_the_secret(sqlite_url, caplog):
    caplog.set_level(logging.DEBUG, logger="amohook")
    svc = WebhookService(
        open_store(sqlite_url), ServerConfig(secret=SECRET, port=0, socket_timeout=2.0, read_deadline=4.0)
    ).start()
    try:
        for data in raw_requests(svc.address):
            send(svc.address, data)
    finally:
        svc.stop(5)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("amohook.server")]
    assert len(lines) >= len(TARGETS) * 2  # every request was logged
    text = "\n".join(lines)
    assert_clean(text)
    assert "/amohook/webhook/***" in text and "/webhooks/***" in text and "/Webhook/***" in text
    assert "http://hooks.example.com/webhook/***" in text
    assert "/x\\x1b[2J\\x07\\x7f" in text  # escapes shown, not sent to the terminal
    assert all("\n" not in line and "\r" not in line for line in lines)


@pytest.mark.slow
def test_a_real_serve_logs_no_near_miss_secret_at_the_default_level(sqlite_url):
    env = cli_env(sqlite_url, AMOHOOK_WEBHOOK_SECRET=SECRET)
    proc = subprocess.Popen(
        [sys.executable, "-m", "amohook", "serve", "--port", "0", "--workers", "0"],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = proc.stdout.readline().decode()
        assert "listening on" in line, line
        host, port = line.rsplit("/", 1)[1].strip().rsplit(":", 1)
        for data in raw_requests((host, int(port))):
            send((host, int(port)), data)
        time.sleep(0.2)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    log = err.decode("utf-8", "replace")
    assert "/webhooks/***" in log  # the near misses were logged (INFO, the default)
    assert_clean(log + out.decode("utf-8", "replace"))
