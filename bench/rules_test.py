#!/usr/bin/env python3
"""`amohook rules test` over a busy week: 10,000 events-log entries, against the rate limit's floor.

A fake amoCRM in this process (enforcing 7 requests per second, its events log in no particular
order) holds ``--leads`` leads, each moved into Qualified and out again (two log entries each), and
a real `amohook rules test --json` subprocess on SQLite rehearses the README's rule over them.
Prints the requests against the minimum (log pages of 100 + lead reads of 250: the floor the
limit sets, in requests and in seconds at 7 per second), writes (must be 0), the rule's matches and
planned tasks (must be one per lead), and the run's wall time against that floor — as measured, and
less the command's fixed start measured in the same round (`amohook rules check` on the same store
and file: Python, imports, the store, compiling the rules; 1.5-2 s on the loaded shared machine),
and the time from the first request to the last as the fake saw them.
Repeated; medians.

    python bench/rules_test.py [--leads 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
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


def prepare(tmp: Path, fake: FakeAmo, leads: int) -> str:
    """The burst benchmark's account; ``leads`` leads each moved New → Qualified → New within the week."""
    db_url, pipeline, new, qualified, user = burst.prepare(tmp, fake)
    now = int(time.time())
    week = 7 * 86400 - 3600
    for i in range(leads):
        lead = fake.add_lead(f"Lead {i}", pipeline, new, user, lead_id=300000 + i)
        at = now - week + i * (week // leads)
        fake.move_lead(lead["id"], qualified, pipeline, at=at)
        fake.move_lead(lead["id"], new, pipeline, at=at + 60)
    return db_url


def one_round(leads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmpdir, FakeAmo() as fake:
        tmp = Path(tmpdir)
        db_url = prepare(tmp, fake, leads)
        fake.clear_requests()
        env = dict(os.environ, AMOHOOK_DB_URL=db_url, PYTHONPATH=str(ROOT))
        env.pop("AMOHOOK_RULES", None)
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "amohook", "rules", "test", "--rules", str(tmp / "rules.toml"), "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        elapsed = time.monotonic() - start
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        start_check = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "amohook", "rules", "check", "--rules", str(tmp / "rules.toml")],
            env=env,
            capture_output=True,
            check=True,
            timeout=120,
        )
        startup = time.monotonic() - start_check
        report = json.loads(proc.stdout)
        seen = sorted(r.mono for r in fake.requests_to("/api/"))
        span = seen[-1] - seen[0]
        [rule] = report["rules"]
        entries = len(fake.events)
        minimum = math.ceil(entries / 100) + math.ceil(leads / 250)
        return dict(
            changes=report["changes"],
            matched=rule["matched"],
            planned=len(rule["actions"]),
            requests=len(fake.requests_to("/api/")),
            writes=sum(1 for r in fake.requests if r.method != "GET"),
            events_pages=len(fake.requests_to("/api/v4/events")),
            lead_reads=len(fake.requests_to("/api/v4/leads", "GET")),
            minimum=minimum,
            count_429=fake.count_429,
            elapsed=elapsed,
            startup=startup,
            span=span,
            floor=minimum / 7.0,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=int, default=5000, help="leads; each adds two log entries")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = []
    for i in range(args.rounds):
        r = one_round(args.leads)
        rounds.append(r)
        print(
            f"round {i + 1}: {r['changes']} changes, matched {r['matched']}, planned {r['planned']}; requests "
            f"{r['requests']} (log pages {r['events_pages']}, lead reads {r['lead_reads']}; minimum {r['minimum']}), "
            f"writes {r['writes']}, 429s {r['count_429']}, {r['elapsed']:.1f} s vs floor {r['floor']:.1f} s = "
            f"{r['elapsed'] / r['floor']:.2f}x; less the command's start ({r['startup']:.1f} s): "
            f"{(r['elapsed'] - r['startup']) / r['floor']:.2f}x; first to last request {r['span']:.1f} s = "
            f"{r['span'] / r['floor']:.2f}x",
            flush=True,
        )
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    ratio = statistics.median(r["elapsed"] / r["floor"] for r in rounds)
    reading = statistics.median((r["elapsed"] - r["startup"]) / r["floor"] for r in rounds)
    spans = statistics.median(r["span"] / r["floor"] for r in rounds)
    print(
        f"median: changes {med('changes'):.0f}, planned {med('planned'):.0f}, requests {med('requests'):.0f} "
        f"(minimum {rounds[0]['minimum']}), writes {med('writes'):.0f}, 429s {med('count_429'):.0f}, "
        f"{med('elapsed'):.1f} s, floor {med('floor'):.1f} s, ratio {ratio:.2f}; less the start "
        f"({med('startup'):.1f} s) {reading:.2f}; first to last request {spans:.2f} "
        "(aim <= 1.2; the limiter's margin alone makes 1.15)"
    )


if __name__ == "__main__":
    main()
