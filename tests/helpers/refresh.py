"""refresh-token's tests: a pair made due, a CLI process started and left running."""

from __future__ import annotations

import subprocess
import sys
import time

from amohook.store.models import Account
from tests.conftest import ROOT, cli_env


def make_due(account_id: int) -> None:
    """Move the pair's issue time back past half of its life."""
    issued = time.time() - 13 * 3600
    Account.update(issued_at=issued, expires_at=issued + 86400).where(Account.id == account_id).execute()


def start_cli(args, db_url):
    return subprocess.Popen(
        [sys.executable, "-m", "amohook", *args],
        env=cli_env(db_url),
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
