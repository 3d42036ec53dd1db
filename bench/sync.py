#!/usr/bin/env python3
"""`sync-entities` on a large account: requests made against the fewest possible, wall time
against the rate-limit floor (requests / 7 per second), and 429s received (must be 0).

The account lives in the fake amoCRM (tests/fakes/amocrm.py) over real HTTP on 127.0.0.1:
50 pipelines x 30 stages (27 own + unsorted + 142 + 143), 1,000 users, 40 task types and
300 lead custom fields. Each round starts a fresh fake and an empty store and times
`amohook.sync.sync_entities` through `client_for` (the store-shared limiter), first into the
empty store, then once more with nothing changed. Prints every round and the medians.

    python bench/sync.py [--rounds 5] [--db-url URL]

--db-url: a database to use instead of a fresh SQLite file per round (its rows for the account
'bench' are deleted before each round).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PIPELINES, STAGES, USERS, TASK_TYPES, FIELDS = 50, 30, 1000, 40, 300
PAGE = 250
RATE = 7


def big_fake():
    from tests.fakes.amocrm import FakeAmo

    fake = FakeAmo(subdomain="bench")
    fake.pipelines.clear()
    for p in range(PIPELINES):
        fake.add_pipeline(f"Pipeline {p:02}", [f"Stage {p:02}.{s:02}" for s in range(STAGES - 3)])
    while len(fake.users) < USERS:
        fake.add_user(f"User {len(fake.users):04}")
    while len(fake.task_types) < TASK_TYPES:
        fake.add_task_type(f"Task type {len(fake.task_types):02}")
    while len(fake.custom_fields) < FIELDS:
        fake.add_custom_field(f"Field {len(fake.custom_fields):03}")
    return fake.start()


def minimum_requests(fake) -> int:
    """One for pipelines (unpaged), one for the account with task types, full pages of the rest."""
    return 1 + 1 + math.ceil(len(fake.users) / PAGE) + math.ceil(len(fake.custom_fields) / PAGE)


def open_clean_store(db_url: str):
    from amohook.store import open_store
    from amohook.store.models import Account, CustomField, Lease, Pipeline, RateWindow, Stage, TaskType, User

    store = open_store(db_url)
    with store.write():
        for model in (Pipeline, Stage, TaskType, User, CustomField):
            model.delete().where(model.account == "bench").execute()
        Account.delete().where(Account.subdomain == "bench").execute()
        RateWindow.delete().where(RateWindow.key == "bench").execute()
        Lease.delete().where(Lease.name == "sync:bench").execute()
    return store


def authorize(store, fake) -> None:
    from amohook.amocrm.oauth import Client, TokenPair
    from amohook.tokens import save_authorization

    access, refresh = fake.issue_tokens()
    save_authorization(
        store,
        subdomain="bench",
        base_url=fake.base_url,
        client=Client(fake.client_id, fake.client_secret, fake.redirect_uri),
        pair=TokenPair(access, refresh, 86400, time.time()),
    )


def timed_sync(store, fake) -> dict:
    from amohook.amocrm.client import client_for
    from amohook.amocrm.ratelimit import MARGIN, PER
    from amohook.sync import sync_entities

    time.sleep(PER + MARGIN + 0.05)  # an empty rate window at both ends: rounds do not slow each other
    fake.clear_requests()
    client = client_for(store, "bench")
    start = time.perf_counter()
    report = sync_entities(store, client)
    wall = time.perf_counter() - start
    if not report.ok:
        raise SystemExit(f"sync failed: {report.error}")
    requests = len(fake.requests_to("/api/"))
    return {
        "requests": requests,
        "minimum": minimum_requests(fake),
        "wall": wall,
        "floor": requests / RATE,
        "429": fake.count_429,
        "limiter_wait": client.limiter.waited,
        "max_in_window": fake.max_in_window(1.0),
        "rows": sum(r.added + r.changed + r.unchanged for r in report.results),
        "written": sum(r.added + r.changed + r.removed for r in report.results),
    }


def show(label: str, r: dict) -> None:
    print(
        f"  {label:<9} requests {r['requests']:>2} (minimum {r['minimum']})  wall {r['wall']:.3f} s  "
        f"floor {r['floor']:.3f} s  ratio {r['wall'] / r['floor']:.2f}  (limiter wait {r['limiter_wait']:.3f} s)  "
        f"429s {r['429']}  "
        f"max/1s {r['max_in_window']}  rows {r['rows']} (written {r['written']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--db-url", help="use this database instead of a fresh SQLite file per round")
    args = parser.parse_args()
    from amohook.amocrm.ratelimit import MARGIN, PER

    print(
        f"account: {PIPELINES} pipelines x {STAGES} stages, {USERS} users, {TASK_TYPES} task types, "
        f"{FIELDS} custom fields; limiter window {RATE} per {PER + MARGIN:.2f} s"
    )
    results: dict[str, list[dict]] = {"first": [], "unchanged": []}
    for n in range(1, args.rounds + 1):
        fake = big_fake()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                store = open_clean_store(args.db_url or f"sqlite:///{tmp}/bench.db")
                authorize(store, fake)
                print(f"round {n}")
                for label in ("first", "unchanged"):
                    r = timed_sync(store, fake)
                    results[label].append(r)
                    show(label, r)
                store.close()
        finally:
            fake.stop()
    print(f"medians over {args.rounds} rounds")
    for label, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        show(label, med)
    worst = max(r["wall"] / r["floor"] for rows in results.values() for r in rows)
    all_minimum = all(r["requests"] == r["minimum"] for rows in results.values() for r in rows)
    no_429 = all(r["429"] == 0 for rows in results.values() for r in rows)
    print(
        f"requests = minimum in every round: {all_minimum}; 429s: {'none' if no_429 else 'SOME'}; "
        f"worst wall/floor {worst:.2f} (aim <= 1.20)"
    )


if __name__ == "__main__":
    main()
