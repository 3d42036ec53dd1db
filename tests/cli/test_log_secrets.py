"""No log line at any level carries a secret (hardening #2): a full run at debug level — init-auth,
sync, a refresh on 401 inside `worker` and inside `serve`, rules creating tasks, refresh-token —
and every byte any of them wrote is searched for every token, code and secret."""

from __future__ import annotations

import subprocess
from urllib.parse import urlencode

import pytest
import requests

from amohook.store import open_store
from amohook.store.models import Account
from tests.conftest import cli_env, run_cli
from tests.helpers.e2e import RULES, init_args, serve_until, settle

SECRET = "log-secret-0123456789abcdef"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def ids_only_hook(lead_id: int, pipeline: dict, stages: dict) -> bytes:
    """A Digital Pipeline style hook: only ids, so the worker fetches the lead (a GET that meets the 401)."""
    return urlencode(
        {
            "leads[status][0][id]": str(lead_id),
            "leads[status][0][status_id]": str(stages["Qualified"]),
            "leads[status][0][pipeline_id]": str(pipeline["id"]),
            "leads[status][0][old_status_id]": str(stages["New"]),
            "leads[status][0][old_pipeline_id]": str(pipeline["id"]),
            "account[id]": "1231414",
            "account[subdomain]": "example",
        }
    ).encode()


@pytest.mark.slow
def test_a_debug_level_run_logs_no_token_code_or_secret(db_url, fake, tmp_path):
    debug = {
        "AMOHOOK_LOG_LEVEL": "debug",
        "AMOHOOK_WEBHOOK_SECRET": SECRET,
        "AMOHOOK_CLIENT_SECRET": fake.client_secret,
    }
    env = cli_env(db_url, **debug)
    written: list[str] = []

    def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        result = run_cli(list(args), db_url, env=env, timeout=timeout)
        written.append(result.stdout + result.stderr)
        assert result.returncode == 0, result.stderr
        return result

    code = fake.issue_code()
    cli(*init_args(fake, code))
    pipeline = fake.add_pipeline("Sales", ["New", "Qualified"])
    stages = {s["name"]: s["id"] for s in pipeline["_embedded"]["statuses"]}
    fake.add_task_type("Call")
    bob = fake.add_user("Bob", "bob@example.com")
    for lead_id in (6001, 6002):
        fake.add_lead(f"Lead {lead_id}", pipeline["id"], stages["Qualified"], bob["id"], lead_id=lead_id)
    cli("sync-entities")
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    store = open_store(db_url)
    try:
        # 1. `serve` only stores; then a separate `worker` meets an expired token and refreshes.
        written.append(
            serve_until(
                db_url,
                ["--workers", "0", "--log-level", "debug"],
                env,
                lambda url: requests.post(
                    f"{url}/webhook/{SECRET}", data=ids_only_hook(6001, pipeline, stages), headers=FORM, timeout=5
                ),
            )
        )
        fake.expire_access_tokens()
        cli("worker", "--rules", str(rules), "--once", "--log-level", "debug", timeout=120)
        assert len(fake.tasks) == 1

        # 2. `serve` with a worker thread meets the next expiry itself (level from the environment).
        fake.expire_access_tokens()

        def deliver(url: str) -> None:
            assert (
                requests.post(
                    f"{url}/webhook/{SECRET}", data=ids_only_hook(6002, pipeline, stages), headers=FORM, timeout=5
                ).status_code
                == 200
            )
            requests.get(f"{url}/healthz", timeout=5)
            settle(fake, 2)

        written.append(serve_until(db_url, ["--workers", "1", "--rules", str(rules)], env, deliver))
        cli("refresh-token", "--force")
        cli("status")
    finally:
        store.close()

    log = "\n".join(written)
    assert " DEBUG amohook." in log  # the run really was at debug level
    assert len(fake.requests_to("/oauth2/access_token")) >= 4  # init-auth, two refreshes on 401, refresh-token
    secrets = {"client secret": fake.client_secret, "authorization code": code, "webhook secret": SECRET}
    secrets.update({f"access token {i}": t for i, t in enumerate(fake._access)})
    secrets.update({f"refresh token {i}": t for i, t in enumerate(fake._refresh)})
    account = Account.get(Account.subdomain == "example")
    assert account.access_token in fake._access and account.refresh_token in fake._refresh
    for name, value in secrets.items():
        assert value not in log, f"the {name} is in the log"
        # Nor a recognisable piece of it (a line cut short): pieces of its second half, which is
        # random in every one of them (a JWT's first part is the same for every token).
        tail = value[len(value) // 2 :]
        for piece in {tail[i : i + 24] for i in range(0, max(1, len(tail) - 24), 97)}:
            assert piece not in log, f"part of the {name} is in the log"


NOTIFY_RULES = """
[[rule]]
name = "new leads to the chat"
when = "lead.added"
[rule.notify]
url_env = "CHAT_URL"
json = { text = "New lead {lead.id}" }
"""


@pytest.mark.slow
def test_library_debug_logs_hold_no_secret_of_the_oauth_callback_nor_the_notify_url(db_url, fake, tmp_path):
    """--library-log-level debug opens peewee's statements with their parameters and urllib3's
    request lines: the client secret stored by /oauth/callback, the state, the code, the tokens,
    the webhook secret, the status password and the notify URL's secret path must not be in them."""
    from amohook.amocrm.oauth import Client
    from amohook.auth import start_authorization
    from amohook.inbox import Incoming, store_deliveries
    from amohook.store.models import Action
    from amohook.webhooks.parse import parse_webhook
    from tests.helpers.actions import Receiver

    chat_secret = "chat-path-Secret-7f3a9c2e51"
    receiver = Receiver()
    chat_url = f"http://127.0.0.1:{receiver.port}/hooks/{chat_secret}?token=query-Secret-88e1b0"
    password = "status-Password-4d2f8a"
    debug = {
        "AMOHOOK_LOG_LEVEL": "debug",
        "AMOHOOK_WEBHOOK_SECRET": SECRET,
        "AMOHOOK_STATUS_PASSWORD": password,
        "CHAT_URL": chat_url,
    }
    env = cli_env(db_url, **debug)
    store = open_store(db_url)
    written: list[str] = []
    try:
        _, state = start_authorization(
            store, client=Client(fake.client_id, fake.client_secret, fake.redirect_uri), base_url=fake.base_url
        )
        code = fake.issue_code()

        def authorize(url: str) -> None:
            page = requests.get(
                f"{url}/oauth/callback",
                params={"code": code, "state": state, "referer": "example.amocrm.ru"},
                timeout=20,
            )
            assert page.status_code == 200 and "amohook is connected" in page.text, page.text
            assert requests.get(f"{url}/status", auth=("admin", password), timeout=20).status_code == 200

        written.append(serve_until(db_url, ["--workers", "0", "--library-log-level", "debug"], env, authorize))
        rules = tmp_path / "rules.toml"
        rules.write_text(NOTIFY_RULES)
        body = fake.webhook_body("add", [{"id": 7001, "name": "Acme"}], entity="leads")
        form = "application/x-www-form-urlencoded"
        store_deliveries(store, [Incoming(body=body, parsed=parse_webhook(body, form), content_type=form)])
        result = run_cli(
            ["worker", "--rules", str(rules), "--once", "--reconcile", "off", "--library-log-level", "debug"],
            db_url,
            env=env,
        )
        written.append(result.stdout + result.stderr)
        assert result.returncode == 0, result.stderr
        assert Action.get(Action.kind == "notify").status == "done" and len(receiver.messages) == 1
    finally:
        store.close()
        receiver.close()

    log = "\n".join(written)
    assert "DEBUG peewee" in log and "DEBUG urllib3" in log  # the libraries really logged
    assert 'INSERT INTO "account"' in log or "INSERT INTO `account`" in log  # the statement that held it
    account = Account.get(Account.subdomain == "example")
    secrets = {
        "client secret": fake.client_secret,
        "state": state,
        "authorization code": code,
        "access token": account.access_token,
        "refresh token": account.refresh_token,
        "webhook secret": SECRET,
        "status password": password,
        "notify path": chat_secret,
        "notify query": "query-Secret-88e1b0",
    }
    assert [name for name, value in secrets.items() if value.lower() in log.lower()] == []
