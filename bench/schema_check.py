#!/usr/bin/env python3
"""What checking the schema against the models costs a command start: opening a store that is
already current with `migrate()` (one catalogue query, one version read, the comparison) against
what an open paid before the check (does schema_version exist, then its highest version through
peewee's query builder). Both in one run, interleaved, medians:

- first open: each round a new process, as every cron command is (the connection's first queries,
  the comparison's tables built once);
- warm: the check repeated on one open store in one process (`--warm-rounds`).

    python bench/schema_check.py [--rounds 40] [--warm-rounds 2000] [--db-url URL ...]

Without --db-url: a new SQLite store in a temporary directory. A MySQL/PostgreSQL URL must name an
existing database amohook may use (it is brought to the current schema first).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def version_alone(store) -> int:
    """migrate()'s fast path before the check: the version number, trusted."""
    from amohook.store.models import SchemaVersion

    if not store.db.table_exists(SchemaVersion._meta.table_name):
        return 0
    return SchemaVersion.select(SchemaVersion.version).order_by(SchemaVersion.version.desc()).scalar() or 0


def child(mode: str, url: str) -> None:
    """One process, one open: prints the milliseconds the schema step took."""
    from amohook.store import open_store
    from amohook.store.migrations import migrate

    store = open_store(url, migrate_schema=False)  # connected, settings applied, nothing read yet
    start = time.perf_counter()
    migrate(store) if mode == "check" else version_alone(store)
    print((time.perf_counter() - start) * 1000)


def first_open(url: str, mode: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, url],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out)


def measure(url: str, rounds: int, warm_rounds: int) -> None:
    from amohook.dburl import redact
    from amohook.store import open_store
    from amohook.store.migrations import migrate

    store = open_store(url)  # the current schema, made or upgraded once
    before, after = [], []
    for i in range(rounds):
        for mode in ("check", "before") if i % 2 else ("before", "check"):
            (after if mode == "check" else before).append(first_open(url, mode))
    warm_before, warm_after = [], []
    for _ in range(warm_rounds):
        start = time.perf_counter()
        version_alone(store)
        warm_before.append(time.perf_counter() - start)
        start = time.perf_counter()
        migrate(store)
        warm_after.append(time.perf_counter() - start)
    store.close()
    name = "sqlite" if url.startswith("sqlite") else redact(url).split("@")[-1]
    for label, b, a in (
        ("first open", statistics.median(before), statistics.median(after)),
        ("warm", statistics.median(warm_before) * 1000, statistics.median(warm_after) * 1000),
    ):
        print(
            f"{name:26} {label:10}  before (version only) {b:6.3f} ms   with the check {a:6.3f} ms   "
            f"{a - b:+.3f} ms ({a / b:.2f}x)"
        )


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="new processes per side")
    parser.add_argument("--warm-rounds", type=int, default=2000)
    parser.add_argument("--db-url", action="append", default=[], help="a database to measure on (repeatable)")
    args = parser.parse_args()
    print(f"medians; first open: {args.rounds} processes per side, warm: {args.warm_rounds} rounds, interleaved")
    with tempfile.TemporaryDirectory() as tmp:
        for url in args.db_url or [f"sqlite:///{tmp}/bench.db"]:
            measure(url, args.rounds, args.warm_rounds)


if __name__ == "__main__":
    main()
