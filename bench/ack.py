"""How fast does `amohook serve` acknowledge webhooks, next to a server that stores nothing?

Both sides are measured in one run, round after round, with the same senders: a bare
``ThreadingHTTPServer`` (same listen backlog) that reads the body and answers 200, and
``amohook serve`` committing every request durably to SQLite (WAL, synchronous=FULL) before its
200. Senders open a new connection per request, as amoCRM does (``Connection: close``), and post
real webhook bodies (tests/fixtures/webhooks), each made unique so none is deduplicated.

    .venv/bin/python bench/ack.py                 # 3 rounds of 4 s per side, 16 senders
    .venv/bin/python bench/ack.py --rounds 5 --seconds 6
    .venv/bin/python bench/ack.py --with-naive    # also a listener committing per request

Prints requests per second of both, their ratio, and p50/p99 answer times; medians over rounds.
At the end it checks that amohook stored exactly as many deliveries as it answered 200.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import re
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "webhooks"
SECRET = "bench-secret-0123456789abcdef"
BACKLOG = 4096  # the same as amohook's ServerConfig.backlog


# -- the bare server ---------------------------------------------------------------------------
class _Bare(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", "3")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"ok\n")
        self.close_connection = True

    def log_message(self, *args):
        pass


class _BareServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = BACKLOG


def run_bare_server() -> None:
    server = _BareServer(("127.0.0.1", 0), _Bare)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


# -- the straightforward design, for comparison (--with-naive) --------------------------------
def run_naive_server(db_url: str) -> None:
    """amohook's listener, but each request thread commits its own transaction on its own
    connection (BEGIN IMMEDIATE, synchronous=FULL): the design the group commit replaces."""
    sys.path.insert(0, str(ROOT))
    from amohook import inbox
    from amohook.store import open_store
    from amohook.webhooks.server import ServerConfig, WebhookService

    store = open_store(db_url)

    class PerRequestCommit:
        def submit(self, item, timeout):
            try:
                with store.write():
                    with inbox.receive.driver_errors_as_peewee():
                        return inbox.receive.store_in_txn(store, [item])[0]
            except Exception as exc:
                raise inbox.StoreUnavailable(str(exc)) from None
            finally:
                store.close()  # a thread per request: its connection goes with it

        def queued(self):
            return 0

    service = WebhookService(store, ServerConfig(secret=SECRET, port=0)).start()
    service.httpd.committer = PerRequestCommit()
    print(f"listening on {service.url}", flush=True)
    threading.Event().wait()


# -- senders -----------------------------------------------------------------------------------
def bodies() -> list[bytes]:
    out = []
    for path in sorted(FIXTURES.glob("*.txt")):
        out.append(path.read_bytes().partition(b"\n\n")[2].rstrip(b"\n"))
    return out


_ID = re.compile(rb"(%5Bid%5D=)(\d+)")


def unique(body: bytes, n: int) -> bytes:
    """The same body with its first entity id replaced, so every request is a new delivery."""
    return _ID.sub(lambda m: m.group(1) + str(900_000_000 + n).encode(), body, count=1)


def request_bytes(path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: amoCRM-Webhooks/3.0\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def send_one(address, data: bytes) -> int:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer else 0


def sender_process(address, path, seconds, threads, first_id, start_at, out_queue) -> None:
    """One process of sender threads; reports (latencies of 200s, other answers, elapsed)."""
    base = bodies()
    counter = itertools.count(first_id)
    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    while time.time() < start_at:
        time.sleep(0.001)
    stop_at = time.monotonic() + seconds

    def loop():
        mine, bad = [], []
        while time.monotonic() < stop_at:
            n = next(counter)
            data = request_bytes(path, unique(base[n % len(base)], n))
            t0 = time.perf_counter()
            try:
                status = send_one(address, data)
            except OSError:
                status = -1
            if status == 200:
                mine.append(time.perf_counter() - t0)
            else:
                bad.append(status)
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    began = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out_queue.put((latencies, errors, time.monotonic() - began))


def measure(address, path, seconds, senders, processes, first_id) -> dict:
    queue: multiprocessing.Queue = multiprocessing.Queue()
    per = [senders // processes + (1 if i < senders % processes else 0) for i in range(processes)]
    start_at = time.time() + 0.3
    procs = [
        multiprocessing.Process(
            target=sender_process, args=(address, path, seconds, n, first_id + i * 10_000_000, start_at, queue)
        )
        for i, n in enumerate(per)
    ]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    latencies = sorted(x for r in results for x in r[0])
    errors = [x for r in results for x in r[1]]
    elapsed = max(r[2] for r in results)
    return {
        "ok": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50": _pct(latencies, 50),
        "p99": _pct(latencies, 99),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), to show where the time goes."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _pct(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * pct / 100))] * 1000


# -- servers as subprocesses -------------------------------------------------------------------
def start(args: list[str], env: dict) -> tuple[subprocess.Popen, tuple[str, int]]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    line = proc.stdout.readline()
    match = re.search(r"listening on http://([\d.]+):(\d+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r} {proc.stderr.read()}")
    return proc, (match.group(1), int(match.group(2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="sending time per side per round")
    parser.add_argument("--senders", type=int, default=16, help="concurrent senders (threads)")
    parser.add_argument("--processes", type=int, default=2, help="sender processes the threads are spread over")
    parser.add_argument(
        "--with-naive",
        action="store_true",
        help="also measure a per-request-transaction listener (the design group commit replaces)",
    )
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--naive-server", metavar="DB_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        run_bare_server()
        return
    if args.naive_server:
        run_naive_server(args.naive_server)
        return

    tmp = tempfile.mkdtemp(prefix="amohook-bench-")
    db_path = Path(tmp) / "bench.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMOHOOK_")}
    env.update(AMOHOOK_DB_URL=f"sqlite:///{db_path}", AMOHOOK_WEBHOOK_SECRET=SECRET, PYTHONPATH=str(ROOT))
    bare, bare_addr = start([sys.executable, __file__, "--bare-server"], env)
    amo, amo_addr = start(
        [sys.executable, "-m", "amohook", "serve", "--port", "0", "--workers", "0", "--log-level", "error"], env
    )
    naive = naive_addr = None
    if args.with_naive:
        naive, naive_addr = start(
            [sys.executable, __file__, "--naive-server", f"sqlite:///{Path(tmp) / 'naive.db'}"], env
        )
    print(
        f"{os.cpu_count()} CPUs; {args.senders} senders in {args.processes} processes; new connection per request; "
        f"{args.rounds} rounds of {args.seconds:g} s per side"
    )
    rows = []
    ids = itertools.count(1)
    try:
        for round_no in range(1, args.rounds + 1):
            order = [("bare", bare_addr, "/webhook"), ("amohook", amo_addr, f"/webhook/{SECRET}")]
            if naive_addr:
                order.append(("naive", naive_addr, f"/webhook/{SECRET}"))
            if round_no % 2 == 0:
                order.reverse()  # neither side always goes first
            result = {}
            pids = {"bare": bare.pid, "amohook": amo.pid, "naive": naive.pid if naive else None}
            for name, addr, path in order:
                pid = pids[name]
                cpu0 = cpu_seconds(pid)
                result[name] = measure(addr, path, args.seconds, args.senders, args.processes, next(ids) * 100_000_000)
                result[name]["cpu_ms"] = (cpu_seconds(pid) - cpu0) * 1000 / max(1, result[name]["ok"])
            ratio = result["amohook"]["rps"] / result["bare"]["rps"]
            rows.append((result, ratio))
            print(
                f"round {round_no}: bare {result['bare']['rps']:7.0f} req/s (p50 {result['bare']['p50']:5.1f} ms, "
                f"p99 {result['bare']['p99']:5.1f} ms) | amohook {result['amohook']['rps']:7.0f} req/s "
                f"(p50 {result['amohook']['p50']:5.1f} ms, p99 {result['amohook']['p99']:5.1f} ms) | ratio {ratio:.2f}"
                f" | server CPU per request: bare {result['bare']['cpu_ms']:.2f} ms,"
                f" amohook {result['amohook']['cpu_ms']:.2f} ms"
                + (
                    f" | non-200: bare {len(result['bare']['errors'])}, amohook {len(result['amohook']['errors'])}"
                    if result["bare"]["errors"] or result["amohook"]["errors"]
                    else ""
                )
            )
            if naive_addr:
                n = result["naive"]
                print(
                    f"         per-request transactions (naive): {n['rps']:7.0f} req/s (p50 {n['p50']:5.1f} ms, "
                    f"p99 {n['p99']:5.1f} ms), ratio {n['rps'] / result['bare']['rps']:.2f}, "
                    f"server CPU per request {n['cpu_ms']:.2f} ms"
                    + (f", non-200: {len(n['errors'])}" if n["errors"] else "")
                )
    finally:
        for proc in (amo, bare, naive):
            if proc is not None:
                proc.terminate()
        for proc in (amo, bare, naive):
            if proc is not None:
                proc.wait(15)

    med = lambda side, key: statistics.median(r[0][side][key] for r in rows)  # noqa: E731
    ratio = statistics.median(r[1] for r in rows)
    if naive_addr:
        print(
            f"median of the per-request-transaction listener: {med('naive', 'rps'):.0f} req/s, "
            f"ratio {statistics.median(r[0]['naive']['rps'] / r[0]['bare']['rps'] for r in rows):.2f}, "
            f"p50 {med('naive', 'p50'):.1f} ms, p99 {med('naive', 'p99'):.1f} ms"
        )
    print(
        f"median: bare {med('bare', 'rps'):.0f} req/s, amohook {med('amohook', 'rps'):.0f} req/s, ratio {ratio:.2f}; "
        f"amohook p50 {med('amohook', 'p50'):.1f} ms, p99 {med('amohook', 'p99'):.1f} ms "
        f"(bare p50 {med('bare', 'p50'):.1f} ms, p99 {med('bare', 'p99'):.1f} ms)"
    )
    acknowledged = sum(r[0]["amohook"]["ok"] for r in rows)
    with sqlite3.connect(db_path) as conn:
        stored = conn.execute("SELECT COUNT(*) FROM delivery").fetchone()[0]
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    print(
        f"amohook answered 200 to {acknowledged} requests and stored {stored} deliveries "
        f"({'all' if stored == acknowledged else 'MISMATCH'}); SQLite journal_mode={mode}, synchronous=FULL, "
        "one writer thread committing each batch in one transaction (group commit)"
    )
    if stored != acknowledged:
        sys.exit(1)


if __name__ == "__main__":
    main()
