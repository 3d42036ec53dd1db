"""What a command imports: cron starts `amohook refresh-token` every 30 minutes, and with nothing
due it should cost no more than Python, typer and peewee (bench/cli_startup.py measures it)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.conftest import cli_env

# Runs the CLI's entry point as `python -m amohook` does, then writes the modules it loaded.
HARNESS = """
import json, sys
from amohook.cli.app import run
code = run(sys.argv[2:])
with open(sys.argv[1], "w") as fh:
    json.dump({"code": code, "modules": sorted(sys.modules)}, fh)
"""

# What a no-op refresh-token has no use for: the HTTP stack (a refresh is not sent), rich (nothing
# is printed), and the parts of amohook that serve other commands.
HEAVY = (
    "requests",
    "urllib3",
    "charset_normalizer",
    "idna",
    "certifi",
    "rich",
    "amohook.actions",
    "amohook.amocrm",
    "amohook.rules",
    "amohook.webhooks",
    "amohook.worker",
    "amohook.runner",
    "amohook.reconcile",
    "amohook.sync",
    "amohook.doctor",
    "amohook.inbox",
)


def loaded(args: list[str], db_url: str, tmp_path) -> tuple[int, list[str], str, str]:
    out = tmp_path / "modules.json"
    proc = subprocess.run(
        [sys.executable, "-c", HARNESS, str(out), *args],
        env=cli_env(db_url),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    return result["code"], result["modules"], proc.stdout, proc.stderr


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in HEAVY or any(m == h or m.startswith(h + ".") for h in HEAVY)]


def authorized(db_url: str, base_url: str, client) -> None:
    """An account whose tokens were just issued: nothing is due for 12 hours."""
    from amohook.amocrm.oauth import TokenPair
    from amohook.store import open_store
    from amohook.tokens import save_authorization

    store = open_store(db_url)
    save_authorization(
        store,
        subdomain="example",
        base_url=base_url,
        client=client,
        pair=TokenPair("a" * 900, "r" * 700, 86400, time.time()),
    )
    store.close()


def test_refresh_token_with_nothing_due_imports_no_http_stack_no_rich_and_no_action_sender(sqlite_url, tmp_path):
    from amohook.amocrm.oauth import Client

    authorized(sqlite_url, "https://example.amocrm.ru", Client("id", "secret", "https://example.org/cb"))
    code, modules, out, err = loaded(["refresh-token", "--quiet"], sqlite_url, tmp_path)
    assert (code, out, err) == (0, "", "")
    assert heavy(modules) == []
    assert "peewee" in modules and "amohook.tokens" in modules  # the harness did run the command


def test_a_refresh_that_is_sent_does_load_the_http_stack(sqlite_url, tmp_path, fake):
    """The check above can fail: what a command really uses shows up in the harness's list."""
    from amohook.amocrm.oauth import Client

    access, refresh = fake.issue_tokens()
    authorized(sqlite_url, fake.base_url, Client(fake.client_id, fake.client_secret, fake.redirect_uri))
    from amohook.store import open_store
    from amohook.store.models import Account

    open_store(sqlite_url)
    Account.update(access_token=access, refresh_token=refresh).execute()
    code, modules, _, err = loaded(["refresh-token", "--force", "--quiet"], sqlite_url, tmp_path)
    assert code == 0, err
    assert {"requests", "amohook.amocrm.oauth"} <= set(heavy(modules))
