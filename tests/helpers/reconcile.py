"""Reconciliation's tests: new leads in the fake, deliveries as the listener stores them, worker and reconcile runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from amohook.inbox import Incoming, store_deliveries
from amohook.store.models import Account
from amohook.webhooks.parse import parse_webhook
from tests.conftest import ROOT, cli_env, run_cli

FORM = "application/x-www-form-urlencoded"


def connected_ago(store, seconds: float) -> None:
    """Make the store look as if the account was connected to it ``seconds`` ago (and the store
    made then): its first look at the events log starts there."""
    from amohook.store.models import SchemaVersion

    with store.write():
        Account.update(created_at=time.time() - seconds).execute()
        SchemaVersion.update(applied_at=time.time() - seconds).execute()


def new_leads(fake, crm, n: int, start: int = 7001) -> list[int]:
    ids = []
    for i in range(n):
        lead = fake.add_lead(f"Lead {i}", crm["pipeline"], crm["new"], crm["anna"], lead_id=start + i)
        ids.append(lead["id"])
    return ids


def deliver(store, fake, action: str, items: list[dict]) -> None:
    """A webhook as the listener stores it (the body amoCRM would POST)."""
    body = fake.webhook_body(action, items)
    store_deliveries(store, [Incoming(body=body, parsed=parse_webhook(body, FORM), content_type=FORM)])


def deliver_entity(store, fake, entity: str, action: str, items: list[dict]) -> None:
    """A webhook about ``entity`` (a task, a contact, …) as the listener stores it."""
    body = fake.webhook_body(action, items, entity=entity)
    store_deliveries(store, [Incoming(body=body, parsed=parse_webhook(body, FORM), content_type=FORM)])


def work(store, crm, *extra: str) -> None:
    result = run_cli(["worker", "--rules", crm["rules"], "--once", "--reconcile", "off", *extra], store.url)
    assert result.returncode == 0, result.stderr


def reconcile(store, *extra: str) -> dict:
    """One pass's JSON summary, its ISO 8601 times read back as Unix seconds for arithmetic."""
    from datetime import datetime

    result = run_cli(["reconcile", "--json", *extra], store.url)
    assert result.returncode == 0, result.stderr
    [summary] = json.loads(result.stdout)
    for name in ("window_from", "window_to", "left_out_from", "left_out_to"):
        if summary[name] is not None:
            summary[name] = int(datetime.fromisoformat(summary[name]).timestamp())
    return summary


def tasks_per_lead(fake) -> dict[int, int]:
    counts: dict[int, int] = {}
    for task in fake.tasks.values():
        counts[task["entity_id"]] = counts.get(task["entity_id"], 0) + 1
    return counts


def amohook_process(db_url: str, args: list[str]) -> subprocess.Popen:
    """A real `amohook` process (for what needs one: concurrency, signals, the worker loop)."""
    return subprocess.Popen(
        [sys.executable, "-m", "amohook", *args],
        env=cli_env(db_url),
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
