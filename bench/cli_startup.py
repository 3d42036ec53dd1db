#!/usr/bin/env python3
"""What cron pays every 30 minutes: `amohook refresh-token` when nothing is due, against the bare
cost of importing amohook's four dependencies (`python -c "import typer, rich, requests, peewee"`).

Both are measured in the same run, interleaved, on a store with one authorized account whose
tokens are fresh. Prints medians and the ratio (aim: <= 1.0).

amohook's bytecode is compiled first and the children may write theirs: with
PYTHONDONTWRITEBYTECODE set (as in some shells and CI), an editable checkout would otherwise be
compiled from source on every run while the dependencies load their installed .pyc files — a cost
no installed amohook pays, which made the ratio look 0.1-0.2 worse than it is.

    python bench/cli_startup.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def prepare(db_url: str) -> None:
    from amohook.amocrm.oauth import Client, TokenPair
    from amohook.store import open_store
    from amohook.tokens import save_authorization

    store = open_store(db_url)
    pair = TokenPair("a" * 900, "r" * 700, 86400, time.time())
    save_authorization(
        store,
        subdomain="bench",
        base_url="https://bench.amocrm.ru",
        client=Client("id", "secret", "https://x"),
        pair=pair,
    )
    store.close()


def compile_amohook() -> None:
    """Write amohook's .pyc files, as `pip install` does, and check that they are there."""
    package = ROOT / "amohook"
    if not compileall.compile_dir(str(package), quiet=1):
        raise SystemExit("compileall failed")
    missing = [p for p in package.rglob("*.py") if not Path(importlib.util.cache_from_source(str(p))).exists()]
    if missing:
        raise SystemExit(f"no bytecode for {missing[0]}")


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    # cwd=ROOT: `python -m` puts the working directory first on the path, so run from elsewhere it
    # could time another checkout's amohook than the one under test.
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db_url = f"sqlite:///{tmp}/bench.db"
        prepare(db_url)
        compile_amohook()
        env = dict(os.environ, AMOHOOK_DB_URL=db_url, PYTHONPATH=str(ROOT))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        baseline_cmd = [sys.executable, "-c", "import typer, rich, requests, peewee"]
        amohook_cmd = [sys.executable, "-m", "amohook", "refresh-token", "--quiet"]
        for _ in range(3):  # warm the page cache for both
            timed(baseline_cmd, env)
            timed(amohook_cmd, env)
        base, ours = [], []
        for _ in range(args.rounds):
            base.append(timed(baseline_cmd, env))
            ours.append(timed(amohook_cmd, env))
    b, o = statistics.median(base), statistics.median(ours)
    print(f"rounds: {args.rounds} (interleaved)")
    print(f"baseline  import typer, rich, requests, peewee : median {b * 1000:7.1f} ms")
    print(f"amohook   refresh-token (nothing due)          : median {o * 1000:7.1f} ms")
    print(f"ratio: {o / b:.2f}  (aim <= 1.00)")


if __name__ == "__main__":
    main()
