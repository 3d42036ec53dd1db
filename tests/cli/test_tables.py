"""Listings read at 80 columns, through a pipe as in a terminal (issue 14 #7): text wraps or
folds, an id is never broken or cut, a name never cut nor replaced by "…"."""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import urlencode

from amohook.amocrm.client import client_for
from amohook.inbox import Incoming, store_deliveries
from amohook.store.models import Event
from amohook.sync import sync_entities
from amohook.webhooks.parse import parse_webhook
from tests.conftest import ROOT, cli_env

FORM = "application/x-www-form-urlencoded"
ACCOUNT = "a-very-long-subdomain-name-of-a-company-that-sells-things"
ENTITY_ID = "1234567890123456789"
ERROR = "ConnectionError: amoCRM did not answer within 30 s; retried with backoff"  # < 80: the list cuts there


def piped(args: list[str], db_url: str) -> str:
    """The real command with stdout a pipe and COLUMNS=80, as `| less` or cron's mail sees it."""
    result = subprocess.run(
        [sys.executable, "-m", "amohook", *args],
        env=cli_env(db_url, COLUMNS="80"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def assert_fits(out: str) -> list[str]:
    lines = out.splitlines()
    assert lines and all(len(line) <= 80 for line in lines), "\n".join(f"{len(x):3} {x}" for x in lines)
    assert "…" not in out, out
    return lines


def squash(text: str) -> str:
    return "".join(text.split())


def column(lines: list[str], heading: str, next_heading: str | None = None) -> list[str]:
    """A left-aligned column's text, one entry per row, whitespace dropped: a row's lines joined,
    so what wrapped at a space and what folded inside a word both come back together. A row
    starts where its first column holds an id; headings are found by their last word, on the
    header's last line (a heading may wrap too)."""
    import re

    rule = next(i for i, line in enumerate(lines) if line.startswith("──"))
    head = lines[rule - 1]

    def at(name: str) -> int:
        found = None
        for word in (name, name.split()[-1]):
            found = found or re.search(rf"(?<!\S){re.escape(word)}(?!\S)(?! id\b)", head)
        assert found, (name, head)
        return found.start()

    start, end = at(heading), (at(next_heading) if next_heading else None)
    rows: list[str] = []
    for line in lines[rule + 1 :]:
        piece = squash(line[start:end])
        if re.match(r"\s*\d+ ", line) or not rows:
            rows.append(piece)
        else:
            rows[-1] += piece
    return rows


def test_events_list_at_80_columns_through_a_pipe_keeps_ids_and_names_whole(store):
    body = urlencode(
        {
            "account[subdomain]": ACCOUNT,
            "leads[responsible][0][id]": ENTITY_ID,
            "leads[responsible][0][responsible_user_id]": "1",
        }
    ).encode()
    store_deliveries(store, [Incoming(body=body, parsed=parse_webhook(body, FORM), content_type=FORM)])
    Event.update(last_error=ERROR).execute()
    lines = assert_fits(piped(["events", "list"], store.url))
    assert any(ENTITY_ID in line for line in lines), "\n".join(lines)  # on one line, not broken
    assert column(lines, "account", "status") == [ACCOUNT], "\n".join(lines)
    assert column(lines, "last error") == [squash(ERROR)], "\n".join(lines)


def test_reference_listings_at_80_columns_keep_ids_and_names_whole(store, fake, account):
    pipeline = fake.add_pipeline("Sales pipeline of the northern region", ["Qualified by the call centre"])
    fake.add_user("Anna-Maria Konstantinopolskaya-Rimskaya", "anna-maria.konstantinopolskaya@example.com")
    fake.add_task_type("Call the client back about the commercial offer")
    sync_entities(store, client_for(store, "example"))
    lines = assert_fits(piped(["pipelines", "-s", "example"], store.url))
    assert any(str(pipeline["id"]) in line for line in lines), "\n".join(lines)
    assert squash("Sales pipeline of the northern region") in "".join(column(lines, "pipeline", "stage id"))
    assert squash("Qualified by the call centre") in "".join(column(lines, "stage")), "\n".join(lines)
    users = assert_fits(piped(["users", "-s", "example"], store.url))
    assert squash("Anna-Maria Konstantinopolskaya-Rimskaya") in column(users, "name", "email"), "\n".join(users)
    assert squash("anna-maria.konstantinopolskaya@example.com") in column(users, "email", "admin")
    types = assert_fits(piped(["task-types", "-s", "example"], store.url))
    wanted = squash("Call the client back about the commercial offer")
    assert wanted in column(types, "name", "code"), "\n".join(types)
