#!/usr/bin/env python3
"""A lone stage change: how long from the webhook's POST to amoCRM receiving the task?

A fake amoCRM in this process and a real `amohook serve --rules` subprocess on SQLite. Single
webhooks are posted one at a time with quiet gaps between them (as on a normal day, not a burst);
for each, the time from the start of the POST to the moment the fake amoCRM received the task's
POST /api/v4/tasks is taken. Prints p50/p90/max per round and medians over rounds; the aim is
under 100 ms. The baseline in the same run: the bare webhook round trip (POST to 200).

    python bench/latency.py [--changes 20] [--gap 0.5] [--rounds 3]
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
from urllib.parse import urlencode

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.burst import SECRET, prepare  # noqa: E402
from tests.fakes.amocrm import FakeAmo  # noqa: E402


def body(lead: int, pipeline: int, old: int, new: int, user: int) -> bytes:
    p = "leads[status][0]"
    return urlencode(
        {
            "account[subdomain]": "example",
            "account[id]": "1231414",
            f"{p}[id]": str(lead),
            f"{p}[name]": f"Lead {lead}",
            f"{p}[status_id]": str(new),
            f"{p}[old_status_id]": str(old),
            f"{p}[pipeline_id]": str(pipeline),
            f"{p}[responsible_user_id]": str(user),
            f"{p}[last_modified]": str(int(time.time())),
        }
    ).encode()


def one_round(changes: int, gap: float) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory() as tmpdir, FakeAmo(clock=time.time) as fake:
        tmp = Path(tmpdir)
        db_url, pipeline, old, new, user = prepare(tmp, fake)
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
                "1",
                "--rules",
                str(tmp / "rules.toml"),
                "--reconcile",
                "off",
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        latencies, acks = [], []
        try:
            line = proc.stdout.readline()
            url = line.strip().split("listening on ", 1)[1] + f"/webhook/{SECRET}"
            session = requests.Session()
            time.sleep(1.0)
            for i in range(changes):
                fake.clear_requests()
                t0 = time.time()
                r = session.post(
                    url,
                    data=body(500000 + i, pipeline, old, new, user),
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                    timeout=5,
                )
                acks.append(time.time() - t0)
                r.raise_for_status()
                deadline = t0 + 10
                while not fake.requests_to("/api/v4/tasks", "POST") and time.time() < deadline:
                    time.sleep(0.001)
                posts = fake.requests_to("/api/v4/tasks", "POST")
                if posts:
                    latencies.append(posts[0].time - t0)
                time.sleep(gap)
        finally:
            proc.terminate()
            proc.wait(15)
        return latencies, acks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--gap", type=float, default=0.5, help="seconds of quiet between changes")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    p50s, maxes, ack50s = [], [], []
    for i in range(args.rounds):
        lat, acks = one_round(args.changes, args.gap)
        lat_ms = sorted(x * 1000 for x in lat)
        p50, p90 = statistics.median(lat_ms), lat_ms[int(0.9 * (len(lat_ms) - 1))]
        ack50 = statistics.median(acks) * 1000
        p50s.append(p50)
        maxes.append(lat_ms[-1])
        ack50s.append(ack50)
        print(
            f"round {i + 1}: {len(lat)} changes, webhook to amoCRM p50 {p50:.0f} ms, p90 {p90:.0f} ms, "
            f"max {lat_ms[-1]:.0f} ms (webhook answered in {ack50:.1f} ms)",
            flush=True,
        )
    print(
        f"median: p50 {statistics.median(p50s):.0f} ms, max {statistics.median(maxes):.0f} ms "
        f"(aim < 100 ms); webhook round trip {statistics.median(ack50s):.1f} ms"
    )


if __name__ == "__main__":
    main()
