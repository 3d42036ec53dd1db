#!/usr/bin/env python3
"""A day's outage: 5,000 lead moves whose webhooks never arrived, recovered from the events log.

A fake amoCRM in this process (enforcing 7 requests per second, its events log in no particular
order) and a real `amohook worker --rules --reconcile` subprocess on SQLite, started after the
outage with the cursor of its last pass from before it. Prints the tasks created (must be 5,000,
no duplicates), the API requests against the minimum (log pages of 100 + lead reads of 250 +
task POSTs of 50), 429s (must be 0), the time from the worker's start to the last task against
the rate-limit floor (minimum requests ÷ 7 per second), and what an idle account costs per hour.
Repeated; medians.

    python bench/reconcile.py [--moves 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import burst  # noqa: E402
from tests.fakes.amocrm import FakeAmo  # noqa: E402


def prepare(tmp: Path, fake: FakeAmo, moves: int) -> tuple[str, list[int]]:
    """The burst benchmark's account, the cursor of a pass from a day ago, and ``moves`` leads moved
    into Qualified over the day since (in the events log only: their webhooks were lost)."""
    from amohook.store import open_store
    from amohook.store.models import Account, ReconcileState, SchemaVersion

    db_url, pipeline, new, qualified, user = burst.prepare(tmp, fake)
    now = int(time.time())
    store = open_store(db_url)
    with store.write():
        # A store in service for a week before the outage (a store reads nothing from before it
        # was connected).
        Account.update(created_at=now - 7 * 86400).execute()
        SchemaVersion.update(applied_at=now - 7 * 86400).execute()
        ReconcileState.insert(account=fake.subdomain, cursor=now - 86400 - 60).execute()
    store.close()
    leads = []
    for i in range(moves):
        lead = fake.add_lead(f"Lead {i}", pipeline, new, user, lead_id=200000 + i)
        fake.move_lead(lead["id"], qualified, pipeline, at=now - 86400 + i * 86400 // moves)
        leads.append(lead["id"])
    return db_url, leads


def one_round(moves: int) -> dict:
    with tempfile.TemporaryDirectory() as tmpdir, FakeAmo() as fake:
        tmp = Path(tmpdir)
        db_url, leads = prepare(tmp, fake, moves)
        fake.clear_requests()
        env = dict(os.environ, AMOHOOK_DB_URL=db_url, PYTHONPATH=str(ROOT))
        start = time.monotonic()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "amohook",
                "worker",
                "--rules",
                str(tmp / "rules.toml"),
                "--reconcile",
                "1h",
                "--workers",
                "2",
                "--batch",
                "50",
                "--poll",
                "0.2",
                "--log-level",
                "error",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = start + 900
            while len(fake.tasks) < moves and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            elapsed = time.monotonic() - start
            time.sleep(1.0)  # anything late would be a duplicate
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=20)
        if len(fake.tasks) < moves:
            print(err[-2000:], file=sys.stderr)
        per_lead: dict[int, int] = {}
        for task in fake.tasks.values():
            per_lead[task["entity_id"]] = per_lead.get(task["entity_id"], 0) + 1
        minimum = math.ceil(moves / 100) + math.ceil(moves / 250) + math.ceil(moves / 50)
        return dict(
            tasks=len(fake.tasks),
            duplicates=sum(c - 1 for c in per_lead.values() if c > 1),
            requests=len(fake.requests_to("/api/")),
            events_pages=len(fake.requests_to("/api/v4/events")),
            lead_reads=len(fake.requests_to("/api/v4/leads", "GET")),
            task_posts=len(fake.requests_to("/api/v4/tasks", "POST")),
            minimum=minimum,
            count_429=fake.count_429,
            elapsed=elapsed,
            floor=minimum / 7.0,
        )


def idle_cost(passes: int = 5) -> tuple[float, float]:
    """Requests per pass for an account with nothing new, and per hour at the default 5m."""
    from amohook.recovery.reconcile import Reconciler
    from amohook.recovery.watchdog import CHECK_EVERY, remember
    from amohook.store import open_store

    with tempfile.TemporaryDirectory() as tmpdir, FakeAmo() as fake:
        db_url, _ = prepare(Path(tmpdir), fake, 0)
        store = open_store(db_url)
        fake.add_webhook("https://hooks.example.com/webhook/x", ["status_lead"])
        remember(store, fake.subdomain, "https://hooks.example.com/webhook/x", ["status_lead"])
        reconciler = Reconciler(store, 300)
        reconciler.run_once()  # the first pass looks at the subscriptions too
        fake.clear_requests()
        for _ in range(passes):
            reconciler.run_once()
        per_pass = len(fake.requests_to("/api/")) / passes
        store.close()
    return per_pass, per_pass * 3600 / 300 + 3600 / CHECK_EVERY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = []
    for i in range(args.rounds):
        r = one_round(args.moves)
        rounds.append(r)
        print(
            f"round {i + 1}: tasks {r['tasks']} (duplicates {r['duplicates']}), requests {r['requests']} "
            f"(log pages {r['events_pages']}, lead reads {r['lead_reads']}, task POSTs {r['task_posts']}; "
            f"minimum {r['minimum']}), 429s {r['count_429']}, catch-up {r['elapsed']:.1f} s vs floor "
            f"{r['floor']:.1f} s = {r['elapsed'] / r['floor']:.2f}x",
            flush=True,
        )
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    ratio = statistics.median(r["elapsed"] / r["floor"] for r in rounds)
    print(
        f"median: tasks {med('tasks'):.0f}, duplicates {med('duplicates'):.0f}, requests {med('requests'):.0f} "
        f"(minimum {rounds[0]['minimum']}), 429s {med('count_429'):.0f}, catch-up {med('elapsed'):.1f} s, "
        f"floor {med('floor'):.1f} s, ratio {ratio:.2f} (aim <= 1.2)"
    )
    per_pass, per_hour = idle_cost()
    print(
        f"idle account: {per_pass:.1f} request(s) per pass; {per_hour:.0f} per hour at the default --reconcile 5m "
        "(plus the watchdog's look every 15 minutes)"
    )


if __name__ == "__main__":
    main()
