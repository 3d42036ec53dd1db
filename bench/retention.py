#!/usr/bin/env python3
"""A year of traffic pruned while the listener is under load.

Builds an SQLite store holding ``--events`` old done deliveries (each a real webhook body from
tests/fixtures/webhooks, made unique, with one event and one attempt, as a busy account leaves
them), starts a real `amohook serve` on it, and keeps a steady load of webhooks on it from
``--senders`` threads. It measures answer times for ``--seconds`` before pruning, then runs
`amohook prune` (another process, as the hourly pruner would be) and measures during it. Prints
p50/p99 before and during, the prune's duration and what it deleted, and the database file's size
before, after, and after VACUUM (what the README tells admins to run to shrink the file).

    python bench/retention.py                      # 1,000,000 old events (about 2 GB, several minutes)
    python bench/retention.py --events 100000      # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures" / "webhooks"
SECRET = "bench-secret-0123456789abcdef"


def fixture_bodies() -> list[bytes]:
    bodies = []
    for path in sorted(FIXTURES.glob("*.txt")):
        text = path.read_bytes()
        body = text.split(b"\n\n", 1)[1] if b"\n\n" in text else text
        if body.strip() and b"=" in body and not body.lstrip().startswith(b"{"):
            bodies.append(body.strip())
    return bodies or [b"leads[status][0][id]=1&leads[status][0][status_id]=2&account[subdomain]=example"]


def build_store(path: Path, events: int) -> None:
    """``events`` old done deliveries with an event and an attempt each, written straight in SQL."""
    from amohook.store import open_store

    open_store(f"sqlite:///{path}").close()  # the schema
    bodies = fixture_bodies()
    old = time.time() - 200 * 86400
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA journal_mode=WAL")
    chunk = 5000
    for start in range(0, events, chunk):
        deliveries, evs, attempts = [], [], []
        for i in range(start, min(events, start + chunk)):
            body = bodies[i % len(bodies)] + f"&amohook_bench={i}".encode()
            deliveries.append(
                (
                    i + 1,
                    f"{i:064x}",
                    body.decode("utf-8", "replace"),
                    "application/x-www-form-urlencoded",
                    '{"user-agent": "amoCRM-Webhooks/3.0"}',
                    "127.0.0.1",
                    old + i * 15,
                    1,
                )
            )
            evs.append(
                (
                    i + 1,
                    i + 1,
                    0,
                    "leads",
                    "status",
                    str(1000 + i),
                    "example",
                    "1231414",
                    f'{{"id":"{1000 + i}","status_id":"142","pipeline_id":"1"}}',
                    "done",
                    1,
                    0,
                    None,
                    None,
                    None,
                    old + i * 15,
                    old + i * 15 + 1,
                )
            )
            attempts.append((i + 1, i + 1, "bench", old + i * 15, old + i * 15 + 1, "ok", None))
        db.executemany(
            "INSERT INTO delivery (id, body_sha256, body, content_type, headers, remote_addr, received_at, "
            "times_received) VALUES (?,?,?,?,?,?,?,?)",
            deliveries,
        )
        db.executemany(
            "INSERT INTO event (id, delivery_id, idx, entity, action, entity_id, account, account_id, data, "
            "status, attempts, next_attempt_at, lease_owner, lease_until, last_error, received_at, "
            "updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            evs,
        )
        db.executemany(
            "INSERT INTO attempt (id, event_id, worker, started_at, finished_at, outcome, error) "
            "VALUES (?,?,?,?,?,?,?)",
            attempts,
        )
        db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def post(port: int, body: bytes) -> float:
    request = (
        f"POST /webhook/{SECRET} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded"
        f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        answer = s.recv(64)
    if not answer.startswith(b"HTTP/1.1 200") and not answer.startswith(b"HTTP/1.0 200"):
        raise RuntimeError(answer[:40])
    return time.perf_counter() - t0


def load(
    port: int, senders: int, stop: threading.Event, out: list[float], counter: list[int]
) -> list[threading.Thread]:
    bodies = fixture_bodies()

    def run(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            counter[0] += 1
            body = bodies[i % len(bodies)] + f"&amohook_live={n}-{i}-{time.time_ns()}".encode()
            out.append(post(port, body))
            time.sleep(0.02)

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(senders)]
    for t in threads:
        t.start()
    return threads


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        path = Path(tmpdir) / "amohook.db"
        t0 = time.monotonic()
        build_store(path, args.events)
        size_before = path.stat().st_size
        print(
            f"built {args.events:,} old done events in {time.monotonic() - t0:.0f} s: {size_before / 2**20:,.0f} MiB "
            f"({size_before / max(1, args.events):,.0f} bytes per delivery)",
            flush=True,
        )
        env = dict(os.environ, AMOHOOK_DB_URL=f"sqlite:///{path}", AMOHOOK_WEBHOOK_SECRET=SECRET, PYTHONPATH=str(ROOT))
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "amohook",
                "serve",
                "--port",
                "0",
                "--workers",
                "0",
                "--keep",
                "off",
                "--log-level",
                "error",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = serve.stdout.readline()
            port = int(line.rsplit(":", 1)[1].strip().rstrip("/"))
            before: list[float] = []
            stop = threading.Event()
            counter = [0]
            threads = load(port, args.senders, stop, before, counter)
            time.sleep(args.seconds)
            during: list[float] = []
            stop.set()
            for t in threads:
                t.join()
            stop = threading.Event()
            threads = load(port, args.senders, stop, during, counter)
            t1 = time.monotonic()
            pruned = subprocess.run(
                [sys.executable, "-m", "amohook", "prune", "--json"], env=env, capture_output=True, text=True
            )
            prune_seconds = time.monotonic() - t1
            stop.set()
            for t in threads:
                t.join()
            result = json.loads(pruned.stdout) if pruned.returncode == 0 else {"error": pruned.stderr.strip()}
        finally:
            serve.terminate()
            serve.wait(15)
        size_after = path.stat().st_size
        db = sqlite3.connect(path)
        live = db.execute("SELECT COUNT(*) FROM event").fetchone()[0]
        db.execute("VACUUM")
        db.close()
        size_vacuum = path.stat().st_size
        print(
            f"listener before pruning: {len(before)} answers, p50 {pct(before, 0.5):.1f} ms, "
            f"p99 {pct(before, 0.99):.1f} ms"
        )
        print(
            f"listener during pruning: {len(during)} answers, p50 {pct(during, 0.5):.1f} ms, "
            f"p99 {pct(during, 0.99):.1f} ms "
            f"(p99 ratio {pct(during, 0.99) / pct(before, 0.99):.2f}x)"
        )
        print(f"prune: {prune_seconds:.0f} s, {result}")
        print(
            f"events left: {live:,} (the {counter[0]:,} posted during the run); "
            f"file {size_before / 2**20:,.0f} MiB before, "
            f"{size_after / 2**20:,.0f} MiB after pruning (freed pages are reused), "
            f"{size_vacuum / 2**20:,.0f} MiB after VACUUM"
        )


if __name__ == "__main__":
    main()
