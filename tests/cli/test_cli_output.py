"""Text from outside — amoCRM's names, a webhook's fields and headers — is printed as text by the
real commands: never read as rich markup, never sent to the terminal as escapes (hardening #10)."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlencode

import pytest

from amohook.amocrm.client import client_for
from amohook.store.models import Event
from amohook.sync import sync_entities
from amohook.webhooks.server import ServerConfig, WebhookService
from tests.conftest import cli_env, run_cli

SECRET = "output-secret-0123456789"
PIPELINE = "[/]Sales [bold]x[/bold]"
STAGE = "Won [/] [link=file:///etc]y[/link]"
USER = "[red]Eve[/red] \x1b[2J \u202eabc"
TASK_TYPE = "Call\x1b]0;pwned\x07 [/]"
SUBDOMAIN = "[/]evil[bold]"
AGENT = "amoCRM-Webhooks/3.0 \x1b[31mred\x07\x9b1m end"


@pytest.fixture
def hostile(store, fake, account):
    """Names full of markup and escapes synced from the fake amoCRM; one delivery whose account and
    User-Agent are hostile, received by the real listener."""
    pipeline = fake.add_pipeline(PIPELINE, ["New", STAGE])
    fake.add_user(USER, "eve@example.com")
    fake.add_task_type(TASK_TYPE)
    sync_entities(store, client_for(store, "example"))
    body = urlencode(
        {
            "account[subdomain]": SUBDOMAIN,
            "leads[status][0][id]": "5001",
            "leads[status][0][name]": "[bold]Lead\x1b[0m",
            "leads[status][0][status_id]": "1",
            "leads[status][0][pipeline_id]": str(pipeline["id"]),
        }
    ).encode()
    svc = WebhookService(store, ServerConfig(secret=SECRET, port=0)).start()
    try:
        with socket.create_connection(svc.address, timeout=10) as sock:
            sock.sendall(
                f"POST /webhook/{SECRET} HTTP/1.1\r\nHost: x\r\nUser-Agent: {AGENT}\r\n"
                f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n".encode(
                    "latin-1"
                )
                + body
            )
            answer = sock.recv(65536)
        assert b" 200 " in answer, answer
    finally:
        svc.stop(5)
    Event.update(last_error="boom [/] \x1b[31m").execute()
    return Event.get()


def assert_shown_as_text(result, *literals: str) -> str:
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Traceback" not in out
    for bad in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert bad not in out, f"{bad!r} reached the terminal:\n{out!r}"
    for literal in literals:
        assert literal in out, f"{literal!r} not shown:\n{out}"
    return out


def test_events_list_shows_markup_and_escapes_as_text(store, hostile):
    result = run_cli(["events", "list"], store.url, env=cli_env(store.url, COLUMNS="300"))
    assert_shown_as_text(result, "[/]evil[bold]", "boom [/] \\x1b[31m")


def test_events_show_prints_a_hostile_user_agent_as_escapes(store, hostile):
    result = run_cli(["events", "show", str(hostile.id)], store.url)
    out = assert_shown_as_text(result, "\\x1b[31mred\\x07\\x9b1m end", "[/]evil[bold]", "[bold]Lead")
    assert "(account [/]evil[bold])" in out


def test_events_show_json_stays_valid_and_escaped(store, hostile):
    result = run_cli(["events", "show", str(hostile.id), "--json"], store.url)
    assert_shown_as_text(result)
    shown = json.loads(result.stdout)
    assert shown["account"] == SUBDOMAIN  # the exact text, escaped only in its JSON form
    assert shown["delivery"]["headers"]["user-agent"].startswith("amoCRM-Webhooks/3.0 \x1b[31mred\x07")


@pytest.mark.parametrize(
    "command, literals",
    [
        (["pipelines"], [PIPELINE, "Won [/] [link=file:///etc]y[/link]"]),
        (["users"], ["[red]Eve[/red] \\x1b[2J \\u202eabc"]),
        (["task-types"], ["Call\\x1b]0;pwned\\x07 [/]"]),
    ],
)
def test_reference_listings_show_names_as_text(store, hostile, command, literals):
    result = run_cli([*command, "--subdomain", "example"], store.url, env=cli_env(store.url, COLUMNS="300"))
    assert_shown_as_text(result, *literals)
