"""Planned actions of every kind, a fake clock, senders, and a local receiver for notify."""

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


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def sender(store, clock=None, **kw) -> ActionSender:
    return ActionSender(store, lambda sub: client_for(store, sub), clock=clock or time.time, **kw)


def quick_sender(store, clock) -> ActionSender:
    """A sender whose client does not sleep through amoCRM's waits (the clock is fake)."""
    return ActionSender(store, lambda sub: client_for(store, sub, sleep=lambda s: None, max_attempts=1), clock=clock)


CRASHING_SENDER = """
import sys
from amohook.actions import ActionSender
from amohook.amocrm.client import client_for
from amohook.store import open_store
store = open_store(sys.argv[1])
ActionSender(store, lambda sub: client_for(store, sub), lease_seconds=2).drain()
"""


# -- create_task, add_note ---------------------------------------------------------------------
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


def planned_note(lead_id: int, text: str = "Moved to Qualified") -> PlannedAction:
    key = hashlib.sha256(f"note|{lead_id}".encode()).hexdigest()
    payload = {"entity_id": lead_id, "note_type": "common", "params": {"text": text}, "request_id": key[:32]}
    return PlannedAction(key=key, rule="r", account="example", lead_id=lead_id, payload=payload, kind="add_note")


# -- move_lead, set_field ----------------------------------------------------------------------
def make_sales(fake) -> dict:
    """A pipeline "Sales" with three leads in "Qualified": the ids of the pipeline, stages and leads."""
    pipeline = fake.add_pipeline("Sales", ["New", "Qualified", "Proposal"])
    stages = {s["name"]: s["id"] for s in pipeline["_embedded"]["statuses"]}
    leads = [
        fake.add_lead(f"Lead {i}", pipeline["id"], stages["Qualified"], 581651, lead_id=9001 + i)["id"]
        for i in range(3)
    ]
    return dict(pipeline=pipeline["id"], leads=leads, **stages)


def move(sales, lead_id: int, to: str = "Proposal", *, key: str | None = None) -> PlannedAction:
    key = key or hashlib.sha256(f"move|{lead_id}|{to}".encode()).hexdigest()
    patch = {"id": lead_id, "status_id": sales[to], "pipeline_id": sales["pipeline"], "request_id": key[:32]}
    return PlannedAction(
        key=key,
        rule="r",
        account="example",
        lead_id=lead_id,
        kind="move_lead",
        payload={"patch": patch, "from": [sales["pipeline"], sales["Qualified"]]},
        target_id=lead_id,
    )


def set_field(lead_id: int, *, field_id=None, value=None, tag=None, key=None) -> PlannedAction:
    key = key or hashlib.sha256(f"field|{lead_id}|{field_id}|{tag}".encode()).hexdigest()
    patch = {"id": lead_id, "request_id": key[:32]}
    if field_id:
        patch["custom_fields_values"] = [{"field_id": field_id, "values": [{"value": value}]}]
    if tag:
        patch["tags_to_add"] = [{"name": tag}]
    return PlannedAction(
        key=key,
        rule="r",
        account="example",
        lead_id=lead_id,
        kind="set_field",
        payload={"patch": patch, "from": None},
        target_id=lead_id,
    )


# -- notify ------------------------------------------------------------------------------------
class Receiver:
    """A real HTTP server on 127.0.0.1: records messages, answers as told, honours Idempotency-Key."""

    def __init__(self, host: str = "127.0.0.1"):
        self.messages: list[tuple[str, dict]] = []
        self.seen: set[str] = set()
        self.answers: list[int | str] = []  # per request: a status, or "drop" (read, then hang up)
        self.refuse: set[str] = set()  # texts of messages answered 400 (a message the receiver refuses)
        self.keys: list[str] = []  # the Idempotency-Key of every request, in order
        self.lose_first = False  # take each message's first request, then hang up without an answer
        self.hang_first = False  # take each message's first request, then never answer (until closed)
        self.closing = threading.Event()
        self.connections = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def setup(self):
                receiver.connections += 1
                super().setup()

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = self.headers.get("Idempotency-Key", "")
                receiver.keys.append(key)
                answer = receiver.answers.pop(0) if receiver.answers else 200
                if json.loads(body).get("text") in receiver.refuse:
                    answer = 400
                first = key not in receiver.seen
                if (receiver.lose_first or receiver.hang_first) and first:
                    answer = "drop"
                if answer in (200, "drop") and key not in receiver.seen:
                    receiver.seen.add(key)
                    receiver.messages.append((key, json.loads(body)))
                if answer == "drop":
                    if receiver.hang_first and first:
                        receiver.closing.wait()
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
        # Polls for shutdown every 0.05 s (the default 0.5 s cost each test that long to stop).
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.closing.set()
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
