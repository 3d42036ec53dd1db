#!/usr/bin/env python3
"""A mass stage change: 1,000 leads moved at once into a stage with a rule.

A fake amoCRM (in this process, enforcing 7 requests per second) and a real `amohook serve
--rules` subprocess on SQLite. The webhooks arrive as amoCRM sends a mass move (several leads per
POST). Prints the tasks created (must be 1,000, no duplicates), the API calls made, 429s (must be
0), and the time from the first webhook to the last task against the rate-limit floor of the
batched calls (task POSTs ÷ 7 per second). Repeated; medians.

    python bench/burst.py [--leads 1000] [--per-post 50] [--rounds 3]
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
from urllib.parse import urlencode

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.amocrm import FakeAmo  # noqa: E402

SECRET = "bench-secret-0123456789abcdef"
RULES = (Path(__file__).resolve().parent.parent / "examples" / "rules.toml").read_text(encoding="utf-8")


def prepare(tmp: Path, fake: FakeAmo) -> tuple[str, int, int, int]:
    from amohook.amocrm.client import client_for
    from amohook.amocrm.oauth import Client, TokenPair
    from amohook.store import open_store
    from amohook.sync import sync_entities
    from amohook.tokens import save_authorization

    pipeline = fake.add_pipeline("Sales", ["New", "Qualified", "Won big"])
    stages = {s["name"]: s["id"] for s in pipeline["_embedded"]["statuses"]}
    fake.add_task_type("Call")
    user = fake.add_user("Anna", "anna@example.com")
    db_url = f"sqlite:///{tmp / 'amohook.db'}"
    store = open_store(db_url)
    access, refresh = fake.issue_tokens()
    save_authorization(
        store,
        subdomain=fake.subdomain,
        base_url=fake.base_url,
        client=Client(fake.client_id, fake.client_secret, fake.redirect_uri),
        pair=TokenPair(access, refresh, 86400, time.time()),
    )
    sync_entities(store, client_for(store, fake.subdomain))
    store.close()
    (tmp / "rules.toml").write_text(RULES)
    return db_url, pipeline["id"], stages["New"], stages["Qualified"], user["id"]


def mass_move_bodies(n: int, per_post: int, pipeline: int, old: int, new: int, user: int) -> list[bytes]:
    bodies = []
    stamp = int(time.time())
    for start in range(0, n, per_post):
        fields: dict[str, str] = {"account[subdomain]": "example", "account[id]": "1231414"}
        for i, lead in enumerate(range(start + 1, min(n, start + per_post) + 1)):
            p = f"leads[status][{i}]"
            fields.update(
                {
                    f"{p}[id]": str(100000 + lead),
                    f"{p}[name]": f"Lead {lead}",
                    f"{p}[status_id]": str(new),
                    f"{p}[old_status_id]": str(old),
                    f"{p}[pipeline_id]": str(pipeline),
                    f"{p}[responsible_user_id]": str(user),
                    f"{p}[last_modified]": str(stamp),
                }
            )
        bodies.append(urlencode(fields).encode())
    return bodies


def one_round(leads: int, per_post: int) -> dict:
    with tempfile.TemporaryDirectory() as tmpdir, FakeAmo() as fake:
        tmp = Path(tmpdir)
        db_url, pipeline, old, new, user = prepare(tmp, fake)
        fake.clear_requests()
        env = dict(os.environ, AMOHOOK_DB_URL=db_url, AMOHOOK_WEBHOOK_SECRET=SECRET, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "amohook",
                "serve",
                "--port",
                "0",
                "--workers",
                "2",
                "--rules",
                str(tmp / "rules.toml"),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = proc.stdout.readline()
            if "listening on" not in line:
                raise SystemExit(f"serve did not start: {line}{proc.stderr.read()}")
            url = line.strip().split("listening on ", 1)[1] + f"/webhook/{SECRET}"
            bodies = mass_move_bodies(leads, per_post, pipeline, old, new, user)
            start = time.monotonic()
            for body in bodies:
                r = requests.post(
                    url, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=5
                )
                r.raise_for_status()
            deadline = start + 600
            while len(fake.tasks) < leads and time.monotonic() < deadline:
                time.sleep(0.05)
            elapsed = time.monotonic() - start
            time.sleep(1.0)  # anything late would be a duplicate
        finally:
            proc.terminate()
            proc.wait(15)
        posts = fake.requests_to("/api/v4/tasks", "POST")
        if os.environ.get("BURST_DEBUG"):
            t0 = posts[0].mono if posts else 0
            print("POST offsets:", [round(p.mono - t0, 2) for p in posts], "sizes:", [len(p.json) for p in posts])
        per_lead: dict[int, int] = {}
        for task in fake.tasks.values():
            per_lead[task["entity_id"]] = per_lead.get(task["entity_id"], 0) + 1
        return dict(
            tasks=len(fake.tasks),
            duplicates=sum(c - 1 for c in per_lead.values() if c > 1),
            api_calls=len(fake.requests_to("/api/")),
            task_posts=len(posts),
            min_posts=math.ceil(leads / 50),
            count_429=fake.count_429,
            elapsed=elapsed,
            floor=len(posts) / 7.0,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=int, default=1000)
    parser.add_argument("--per-post", type=int, default=50, help="leads per webhook POST")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = []
    for i in range(args.rounds):
        r = one_round(args.leads, args.per_post)
        rounds.append(r)
        print(
            f"round {i + 1}: tasks {r['tasks']} (duplicates {r['duplicates']}), API calls {r['api_calls']} "
            f"(task POSTs {r['task_posts']}, minimum {r['min_posts']}), 429s {r['count_429']}, "
            f"time {r['elapsed']:.2f} s vs floor {r['floor']:.2f} s = {r['elapsed'] / r['floor']:.2f}x"
        )
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    print(
        f"median: tasks {med('tasks'):.0f}, duplicates {med('duplicates'):.0f}, API calls {med('api_calls'):.0f}, "
        f"task POSTs {med('task_posts'):.0f} (minimum {rounds[0]['min_posts']}), 429s {med('count_429'):.0f}, "
        f"time {med('elapsed'):.2f} s, floor {med('floor'):.2f} s, "
        f"ratio {statistics.median(r['elapsed'] / r['floor'] for r in rounds):.2f} (aim <= 1.2)"
    )


if __name__ == "__main__":
    main()
