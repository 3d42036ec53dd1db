"""Webhook deliveries as amoCRM sends them, and the inbox as the listener and workers use it."""

from __future__ import annotations

from pathlib import Path

from amohook import inbox
from amohook.inbox import Incoming
from amohook.webhooks.parse import parse_webhook

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "webhooks"
FORM = "application/x-www-form-urlencoded"
NOW = 1_800_000_000.0


def fixture_body(name: str) -> bytes:
    return (FIXTURES / name).read_bytes().partition(b"\n\n")[2].rstrip(b"\n")


def incoming(body: bytes, content_type: str = FORM, **kw) -> Incoming:
    return Incoming(body=body, parsed=parse_webhook(body, content_type), content_type=content_type, **kw)


def lead_body(lead_id: int, action: str = "status", items: int = 1) -> bytes:
    parts = [
        f"leads%5B{action}%5D%5B{i}%5D%5Bid%5D={lead_id + i}&leads%5B{action}%5D%5B{i}%5D%5Bstatus_id%5D=142"
        for i in range(items)
    ]
    return ("&".join(parts) + "&account%5Bsubdomain%5D=example&account%5Bid%5D=42").encode()


def claim(store, owner, now=NOW, limit=10, lease=60.0, max_attempts=5):
    return inbox.claim(store, owner, limit=limit, lease_seconds=lease, max_attempts=max_attempts, now=now)
