"""Planned actions and a real HTTP receiver, for the sender's tests (tasks, lead changes, notify)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time

from amohook.actions import ActionSender
from amohook.actions.base import PlannedAction
from amohook.actions.notify import idempotency_key
from amohook.amocrm.client import client_for

RESPONSIBLE = 581651  # an existing user of the fake account
TASK_TYPE = 1


def planned(lead_id: int, *, rule="r", text=None, task_type=TASK_TYPE, key=None) -> PlannedAction:
    key = key or hashlib.sha256(f"{rule}|{lead_id}".encode()).hexdigest()
    payload = {
        "text": text or f"Call lead {lead_id}",
        "complete_till": 1_900_000_000 + lead_id,
        "entity_id": lead_id,
        "entity_type": "leads",
        "task_type_id": task_type,
        "responsible_user_id": RESPONSIBLE,
        "request_id": key[:32],
    }
    return PlannedAction(key=key, rule=rule, account="example", lead_id=lead_id, payload=payload, kind="create_task")


def sender(store, clock=None, **kw) -> ActionSender:
    return ActionSender(store, lambda sub: client_for(store, sub), clock=clock or time.time, **kw)


class Receiver:
    """A real HTTP server on 127.0.0.1: records messages, answers as told, honours Idempotency-Key."""

    def __init__(self, host: str = "127.0.0.1"):
        self.messages: list[tuple[str, dict]] = []
        self.seen: set[str] = set()
        self.answers: list[int | str] = []  # per request: a status, or "drop" (read, then hang up)
        self.connections = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def setup(self):
                receiver.connections += 1
                super().setup()

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = self.headers.get("Idempotency-Key", "")
                answer = receiver.answers.pop(0) if receiver.answers else 200
                if answer in (200, "drop") and key not in receiver.seen:
                    receiver.seen.add(key)
                    receiver.messages.append((key, json.loads(body)))
                if answer == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                self.send_response(answer)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/hook/s3cr3t-token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def notify(lead_id: int, text: str = "Won: Acme") -> PlannedAction:
    key = hashlib.sha256(f"notify|{lead_id}".encode()).hexdigest()
    return PlannedAction(
        key=key,
        rule="r",
        account="example",
        lead_id=lead_id,
        kind="notify",
        payload={
            "url_env": "CHAT_URL",
            "json": {"text": text, "lead": {"id": lead_id}},
            "idempotency_key": idempotency_key(key),
        },
    )
