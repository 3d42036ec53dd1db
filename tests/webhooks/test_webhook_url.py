"""The webhook URL is never lost (#14.4): `serve` without a configured secret keeps the one it
makes in the store, `amohook webhooks url` prints the URL to give amoCRM, `webhooks subscribe`
uses the same secret, and an explicitly configured AMOHOOK_WEBHOOK_SECRET still wins."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from amohook.errors import ExitCode
from amohook.store.models import StoreSetting
from amohook.webhooks.secret import SETTING, keep_secret, stored_secret
from tests.conftest import ROOT, cli_env, run_cli

PUBLIC = "https://hooks.example.com"
BODY = b"leads[status][0][id]=5001&leads[status][0][status_id]=2&account[subdomain]=example"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class Serve:
    """`amohook serve` as the quick start runs it: no secret in the environment unless given."""

    def __init__(self, db_url: str, **env: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "amohook", "serve", "--port", "0", "--log-level", "debug"],
            env=cli_env(db_url, **env),
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert "listening on" in line, line + self.proc.stderr.read()
        self.url = line.split("listening on ", 1)[1].strip()

    def post(self, secret: str) -> int:
        return requests.post(f"{self.url}/webhook/{secret}", data=BODY, headers=FORM, timeout=5).status_code

    def stop(self) -> str:
        """Stop it; returns everything it logged."""
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=20)
        return err


def printed_secret(db_url: str, **env: str) -> str:
    result = run_cli(["webhooks", "url", "--public-url", PUBLIC], db_url, env=cli_env(db_url, **env))
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert line.startswith(PUBLIC + "/webhook/"), line
    return line.rsplit("/", 1)[1]


@pytest.mark.slow
def test_serve_keeps_the_secret_it_makes_and_webhooks_url_prints_the_url_that_works(db_url):
    serve = Serve(db_url)
    try:
        secret = printed_secret(db_url)
        assert serve.post(secret) == 200
        assert serve.post("not-the-secret-0123456789") == 404
    finally:
        log = serve.stop()
    assert secret not in log, "the webhook secret was logged"
    assert "webhook secret: the one kept in the store" in log
    # A restart uses the same secret: the URL amoCRM was given keeps working.
    again = Serve(db_url)
    try:
        assert again.post(secret) == 200
    finally:
        log = again.stop()
    assert secret not in log
    assert printed_secret(db_url) == secret
    status = run_cli(["status", "--json"], db_url)
    assert secret not in status.stdout + status.stderr


@pytest.mark.slow
def test_an_explicit_secret_wins_over_the_stored_one(db_url):
    from amohook.store import open_store

    kept = keep_secret(open_store(db_url))
    explicit = "explicit-secret-0123456789"
    serve = Serve(db_url, AMOHOOK_WEBHOOK_SECRET=explicit)
    try:
        assert serve.post(explicit) == 200
        assert serve.post(kept) == 404
    finally:
        log = serve.stop()
    assert explicit not in log and "webhook secret: from AMOHOOK_WEBHOOK_SECRET" in log
    assert printed_secret(db_url, AMOHOOK_WEBHOOK_SECRET=explicit) == explicit
    assert printed_secret(db_url) == kept  # what a serve without it would use
    assert stored_secret(open_store(db_url)) == kept  # the explicit one is never written to the store


def test_keep_secret_makes_one_secret_and_keeps_it(store):
    assert stored_secret(store) is None
    first = keep_secret(store)
    assert len(first) >= 32 and keep_secret(store) == first
    assert [(r.name, r.value) for r in StoreSetting.select()] == [(SETTING, first)]


def test_webhooks_url_says_what_is_missing(sqlite_url):
    from amohook.store import open_store

    missing = run_cli(["webhooks", "url", "--public-url", PUBLIC], sqlite_url)  # no store: none is made
    assert missing.returncode == ExitCode.USAGE and "no amohook store at" in missing.stderr
    open_store(sqlite_url).close()  # a store whose serve never ran
    none = run_cli(["webhooks", "url", "--public-url", PUBLIC], sqlite_url)
    assert none.returncode == ExitCode.USAGE
    assert "amohook serve" in none.stderr and sqlite_url.split("///", 1)[1] in none.stderr
    assert none.stdout == "" and "Traceback" not in none.stderr
    no_address = run_cli(["webhooks", "url"], sqlite_url, env=cli_env(sqlite_url, AMOHOOK_WEBHOOK_SECRET="s" * 20))
    assert no_address.returncode == ExitCode.USAGE and "--public-url" in no_address.stderr
    bad = run_cli(
        ["webhooks", "url", "--public-url", "https://hooks.example.com/?x=1"],
        sqlite_url,
        env=cli_env(sqlite_url, AMOHOOK_WEBHOOK_SECRET="s" * 20),
    )
    assert bad.returncode == ExitCode.USAGE and "without query" in bad.stderr
    from_env = run_cli(
        ["webhooks", "url"],
        sqlite_url,
        env=cli_env(sqlite_url, AMOHOOK_WEBHOOK_SECRET="s" * 20, AMOHOOK_PUBLIC_URL="https://example.com/amohook/"),
    )
    assert from_env.returncode == 0 and from_env.stdout == f"https://example.com/amohook/webhook/{'s' * 20}\n"


def test_webhooks_subscribe_uses_the_stored_secret(store, fake, account):
    secret = keep_secret(store)
    result = run_cli(["webhooks", "subscribe", "--public-url", PUBLIC], store.url)
    assert result.returncode == 0, result.stderr
    assert [h["destination"] for h in fake.webhooks] == [f"{PUBLIC}/webhook/{secret}"]
    assert secret not in result.stdout + result.stderr
    gone = run_cli(["webhooks", "unsubscribe", "--url", PUBLIC + "/webhook/{secret}"], store.url)
    assert gone.returncode == 0, gone.stderr
    assert fake.webhooks == []
