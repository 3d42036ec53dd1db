#!/usr/bin/env python3
"""What the lead.stale check costs: 10,000 leads in the watched stage.

A fake amoCRM in this process and a store on SQLite with the burst benchmark's account and a rule
"3 days in Qualified → a task". Two states of the account:

- first look: amohook has just started; the 10,000 leads entered Qualified over the last two days
  (their moves are in the events log only). The check lists the stage (pages of 250) and looks up
  when each lead entered (ten leads a log request): counted with the fake's limit off, since only
  the count matters (the time is that count ÷ 7 a second).
- steady: every lead's entry is settled (what the first look leaves); a check lists the stage and
  queues nothing. Timed through the shared 7/s limiter against the floor (n requests at 7 in any
  second take at least ceil(n / 7) - 1 seconds), repeated; medians.

    python bench/stale.py [--leads 10000] [--rounds 3]
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

from bench import burst  # noqa: E402
from tests.fakes.amocrm import FakeAmo  # noqa: E402

RULES = """
[[rule]]
name = "Stalled in Qualified"
when = "lead.stale"
pipeline = "Sales"
stage = "Qualified"
after = "3d"

[rule.create_task]
type = "Call"
text = "{lead.name} has waited three days"
"""


def prepare(tmp: Path, fake: FakeAmo, leads: int):
    """The account, the stale rule compiled, and ``leads`` leads moved into Qualified over two days."""
    from amohook.rules import load_and_compile
    from amohook.store import open_store

    db_url, pipeline, new, qualified, user = burst.prepare(tmp, fake)
    (tmp / "stale.toml").write_text(RULES)
    now = int(time.time())
    for i in range(leads):
        lead = fake.add_lead(f"Lead {i}", pipeline, new, user, lead_id=300000 + i)
        lead.update(created_at=now - 5 * 86400, updated_at=now - 5 * 86400)
        fake.move_lead(lead["id"], qualified, pipeline, at=now - 2 * 86400 + i * 2 * 86400 // max(leads, 1))
    store = open_store(db_url)
    return store, load_and_compile(tmp / "stale.toml")


def first_look(leads: int) -> dict:
    from amohook.amocrm.client import client_for
    from amohook.rules.stale import StaleCheck

    with tempfile.TemporaryDirectory() as tmpdir, FakeAmo(rate_limit=None) as fake:
        store, rules = prepare(Path(tmpdir), fake, leads)
        fake.clear_requests()
        start = time.monotonic()
        result = StaleCheck(store, rules).check(fake.subdomain, client_for(store, fake.subdomain, shared_limit=False))
        elapsed = time.monotonic() - start
        out = dict(
            requests=len(fake.requests_to("/api/")),
            listing=len(fake.requests_to("/api/v4/leads", "GET")),
            log=len(fake.requests_to("/api/v4/events", "GET")),
            looked_up=result.looked_up,
            queued=result.queued,
            elapsed=elapsed,
        )
        store.close()
        return out


def steady(leads: int, rounds: int) -> list[dict]:
    from amohook.amocrm.client import client_for
    from amohook.rules.stale import StaleCheck

    out = []
    with tempfile.TemporaryDirectory() as tmpdir, FakeAmo(rate_limit=None) as fake:
        store, rules = prepare(Path(tmpdir), fake, leads)
        StaleCheck(store, rules).check(fake.subdomain, client_for(store, fake.subdomain, shared_limit=False))
        fake.rate_limit = 7  # from here on amoCRM's limit, and amohook's shared limiter
        client = client_for(store, fake.subdomain)
        for _ in range(rounds):
            time.sleep(1.0)  # a fresh second of the limit for each round
            fake.clear_requests()
            start = time.monotonic()
            result = StaleCheck(store, rules).check(fake.subdomain, client)
            elapsed = time.monotonic() - start
            requests = len(fake.requests_to("/api/"))
            out.append(
                dict(
                    requests=requests,
                    queued=result.queued,
                    looked_up=result.looked_up,
                    count_429=fake.count_429,
                    elapsed=elapsed,
                    # amoCRM's limit is 7 in any second: n requests need at least ceil(n / 7) - 1 s.
                    floor=max(math.ceil(requests / 7) - 1, 1),
                )
            )
        store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    first = first_look(args.leads)
    expected = math.ceil(args.leads / 250) + math.ceil(args.leads / 10)
    print(
        f"first look, {args.leads} leads in the stage: {first['requests']} requests (listing {first['listing']} "
        f"pages of 250, log {first['log']} requests of 10 leads; expected {expected}), "
        f"{first['looked_up']} looked up, {first['queued']} queued; {first['requests'] / 7:.0f} s of the 7/s budget "
        f"(once per lead amohook never saw enter)",
        flush=True,
    )
    rounds = steady(args.leads, args.rounds)
    for i, r in enumerate(rounds, 1):
        print(
            f"steady round {i}: {r['requests']} requests, {r['looked_up']} looked up, {r['queued']} queued, "
            f"429s {r['count_429']}, {r['elapsed']:.2f} s vs floor {r['floor']:.2f} s "
            f"= {r['elapsed'] / r['floor']:.2f}x",
            flush=True,
        )
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    print(
        f"steady median: {med('requests'):.0f} requests a check (expected {math.ceil(args.leads / 250)}), "
        f"{med('elapsed'):.2f} s, ratio {statistics.median(r['elapsed'] / r['floor'] for r in rounds):.2f}; "
        f"at the default --reconcile 5m: {med('requests') * 12:.0f} requests an hour, "
        f"{med('requests') / 7 / 300:.1%} of the 7/s budget"
    )


if __name__ == "__main__":
    main()
