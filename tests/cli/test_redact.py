"""The pure helpers that keep secrets out of the log and escapes off the terminal."""

from __future__ import annotations

import logging
import secrets

import pytest

from amohook.redact import RedactingFormatter, printable, redact_secrets, redact_target

SECRET = "Abc-def_0123456789xyz"


def test_printable_shows_control_characters_as_escapes():
    assert printable("a\x1b[31mred\x07\x7f\x9b\u202e\r\n\tz") == "a\\x1b[31mred\\x07\\x7f\\x9b\\u202e\\x0d\\x0a\\x09z"
    assert printable("line\n\tnext\x1b", multiline=True) == "line\n\tnext\\x1b"
    assert printable("[bold]Ünïcode ✓[/]") == "[bold]Ünïcode ✓[/]"


@pytest.mark.parametrize(
    "target, shown",
    [
        (f"/webhook/{SECRET}", "/webhook/***"),
        (f"/amohook/webhook/{SECRET}", "/amohook/webhook/***"),
        (f"/webhooks/{SECRET}", "/webhooks/***"),
        (f"/Webhook/{SECRET}", "/Webhook/***"),
        (f"/WEBHOOK/{SECRET}/x?y=1", "/WEBHOOK/***"),
        (f"/webhook%2F{SECRET}", "/webhook/***"),
        (f"/webhook%252F{SECRET}", "/webhook/***"),
        (f"/webhook{SECRET}", "/webhook***"),
        (f"http://hooks.example.com/webhook/{SECRET}", "http://hooks.example.com/webhook/***"),
        (f"/{SECRET}", "/***"),
        (f"/hook/{SECRET[:-1]}", "/hook/***"),  # one character short: still most of the secret
        (f"/hook/{SECRET.lower()}", "/hook/***"),
        ("/" + "".join(f"%{ord(c):02X}" for c in SECRET), "/***"),
        ("/oauth/callback?code=def50200abc&state=x", "/oauth/callback"),
        ("/healthz", "/healthz"),
        ("/x\x1b[2J\r\nforged line", "/x\\x1b[2J\\x0d\\x0aforged line"),
    ],
)
def test_a_request_target_is_logged_without_the_secret(target, shown):
    assert redact_target(target, SECRET) == shown


def test_a_long_target_is_cut():
    assert len(redact_target("/" + "a" * 100_000, SECRET)) == 200


def test_token_shaped_strings_are_removed_from_a_line():
    jwt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiIxMjM0NSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    refresh = "def50200" + secrets.token_hex(300)
    sha = secrets.token_hex(32)
    line = (
        f"('UPDATE account SET access_token = ?, refresh_token = ?', ['{jwt}', '{refresh}']) "
        f"Authorization: Bearer abc.def client_secret=s3cr3t&code=def5 delivery {sha}"
    )
    out = redact_secrets(line, known=["s3cr3t"])
    for value in (jwt, refresh, "abc.def", "s3cr3t", "def5"):
        assert value not in out
    assert sha in out  # a delivery's SHA-256 stays useful


def test_the_formatter_redacts_messages_exceptions_and_known_secrets():
    formatter = RedactingFormatter("%(levelname)s %(message)s", secrets=[SECRET])
    try:
        raise ValueError(f"bad {SECRET} \x1b[31m")
    except ValueError:
        import sys

        record = logging.LogRecord("amohook.x", logging.ERROR, __file__, 1, "got %s", (SECRET.upper(),), sys.exc_info())
    out = formatter.format(record)
    assert SECRET not in out and SECRET.upper() not in out
    assert "\x1b" not in out and "\\x1b[31m" in out
    assert "Traceback" in out and "\n" in out  # a traceback keeps its lines


@pytest.mark.parametrize(
    "destination, shown",
    [
        ("https://h.example.com/amo/Amo-Path-Secret-0123456789", "https://h.example.com/amo/***"),
        ("https://h.example.com/Amo-Path-Secret-0123456789/in", "https://h.example.com/***/in"),
        ("https://h.example.com/webhook/short", "https://h.example.com/webhook/***"),
        ("https://user:pw@h.example.com/amo/x?token=1", "https://***@h.example.com/amo/x?***"),
        ("https://h.example.com/hooks/amocrm", "https://h.example.com/hooks/amocrm"),
    ],
)
def test_a_destination_is_shown_without_anything_that_may_be_the_secret(destination, shown):
    from amohook.recovery.watchdog import redact_destination

    assert redact_destination(destination) == shown


def test_a_held_secret_is_cut_from_a_destination_wherever_it_stands():
    from amohook.recovery.watchdog import redact_destination
    from amohook.redact import hold_secret

    hold_secret("short-s3cret")  # shorter than a segment that is cut anyway
    assert redact_destination("https://short-s3cret.example.com/a/SHORT-S3CRET") == "https://***.example.com/a/***"


def test_a_held_secret_leaves_every_log_line_a_library_writes():
    from amohook.redact import hold_secret

    hold_secret("Client-Secret-Held-0042")
    hold_secret("abc")  # too short to hold: it would cut ordinary words from every line
    record = logging.LogRecord(
        "peewee", logging.DEBUG, __file__, 1, "%r", (("UPDATE x", ["client-secret-held-0042", "abc"]),), None
    )
    line = RedactingFormatter("%(name)s: %(message)s").format(record)
    assert "Held-0042".lower() not in line.lower() and "'abc'" in line and "***" in line


def test_tokens_are_held_while_they_are_recent():
    from amohook.redact import _MAX_PASSING, HELD, hold_secret

    hold_secret("lasting-secret-value")
    for i in range(_MAX_PASSING + 5):
        hold_secret(f"token-{i:06d}", lasting=False)
    held = HELD.values()
    assert "lasting-secret-value" in held and f"token-{_MAX_PASSING + 4:06d}" in held and "token-000000" not in held
