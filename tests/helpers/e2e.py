"""The real `amohook` end to end: `init-auth` arguments, `serve` in a process, the README's rule, settling."""

from __future__ import annotations

import subprocess
import sys
import time
from urllib.parse import urlencode

import requests

from amohook.store.models import Action, Event
from tests.conftest import ROOT, cli_env

SECRET = "e2e-secret-0123456789abcdef"
RULES = (ROOT / "examples" / "rules.toml").read_text(encoding="utf-8")
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def stage_body(crm, lead_id=5001, *, block="status", name="Acme", stamp=1_750_000_000, **extra) -> bytes:
    p = f"leads[{block}][0]"
    fields = {
        "account[subdomain]": "example",
        "account[id]": "1231414",
        f"{p}[id]": str(lead_id),
        f"{p}[name]": name,
        f"{p}[status_id]": str(crm["qualified"]),
        f"{p}[old_status_id]": str(crm["new"]),
        f"{p}[pipeline_id]": str(crm["pipeline"]),
        f"{p}[responsible_user_id]": str(crm["anna"]),
        f"{p}[last_modified]": str(stamp),
    }
    fields.update(extra)
    return urlencode(fields).encode()


class Serve:
    def __init__(self, db_url, *args):
        env = cli_env(db_url, AMOHOOK_WEBHOOK_SECRET=SECRET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "amohook", "serve", "--port", "0", "--log-level", "warning", *args],
            env=env,
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert "listening on" in line, line + self.proc.stderr.read()
        self.url = line.split("listening on ", 1)[1].strip()

    def post(self, body: bytes) -> int:
        return requests.post(f"{self.url}/webhook/{SECRET}", data=body, headers=FORM, timeout=5).status_code

    def stop(self):
        self.proc.terminate()
        self.proc.wait(15)


def settle(fake, expected_tasks: int, timeout: float = 30.0) -> None:
    """Wait until the queue is empty, no action is unsettled, and the fake holds the tasks."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        busy = Event.select().where(Event.status.in_(["pending", "running"])).count()
        unsent = Action.select().where(Action.status.in_(["pending", "sending"])).count()
        if not busy and not unsent and len(fake.tasks) >= expected_tasks:
            time.sleep(0.3)  # anything late would be a duplicate
            return
        time.sleep(0.05)
    raise AssertionError(f"not settled: {len(fake.tasks)} tasks, events/actions still busy")


def init_args(fake, code):
    return [
        "init-auth",
        "--subdomain",
        "example",
        "--base-url",
        fake.base_url,
        "--client-id",
        fake.client_id,
        "--redirect-uri",
        fake.redirect_uri,
        "--code",
        code,
    ]


def serve_until(db_url: str, args: list[str], env: dict, work) -> str:
    """Run `serve` with ``args``, call ``work(url)``, stop it; returns everything it wrote."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "amohook", "serve", "--port", "0", *args],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line + proc.stderr.read()
        work(line.split("listening on ", 1)[1].strip())
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    return line + out + err
