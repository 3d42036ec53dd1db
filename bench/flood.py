"""Does a real webhook still get its 200 in time while `amohook serve` is flooded with connections?

A real `amohook serve` (SQLite, WAL, synchronous=FULL) runs under `ulimit -n 1024`, the usual
default. Per round, three phases of the same length, each while real webhooks (a valid secret,
real amoCRM bodies from tests/fixtures/webhooks, each made unique) are sent at a steady rate on
new connections, as amoCRM sends them:

- quiet: nothing else;
- idle: a flooder process holds 2,000 connections that send nothing (and opens a new one
  whenever the server closes one);
- slow: the flooder holds 2,000 connections that send a request head a byte at a time;
- linger: the flooder sends 300 requests a second without the secret (``POST`` to a wrong
  secret, to ``/healthz``, to an unknown path) announcing ``Content-Length: 100000`` and never
  sending the body, each connection kept open 2 s, so that the server's lingering over the body
  after its 404/405 lasts as long as the server allows.

With ``--baseline REV`` (a git revision, e.g. ``main``), each phase is also run, in the same
rounds and right after it, against a second ``amohook serve`` running REV's code (``git
archive``), and the ratios of the p99s are printed.

    .venv/bin/python bench/flood.py                      # 3 rounds of 5 s per phase
    .venv/bin/python bench/flood.py --rounds 5 --connections 2000 --rate 20 --linger-rate 300
    .venv/bin/python bench/flood.py --baseline 40bd2a7   # each phase against that revision too

Prints, per phase, the webhooks' p50/p99/max answer time, how many got 200 within amoCRM's 2 s,
and the server's threads (at the end, and the peak), memory and CPU; then the medians over
rounds. The aim: p99 under 1 s (amoCRM waits 2 s).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import re
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ack import SECRET, bodies, request_bytes, unique  # noqa: E402  (same bodies and requests as bench/ack.py)

ROOT = Path(__file__).resolve().parent.parent
NOFILE = 1024


# -- the flooder (a process of its own, so it does not slow the webhook sender) ------------------
def flooder(address, mode: str, count: int, ready, stop) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sel = selectors.DefaultSelector()
    socks: dict[socket.socket, int] = {}  # socket -> bytes of the head already sent
    head = f"POST /webhook/{'x' * 24} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\n".encode() * 50

    def connect() -> None:
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(address)
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            return
        sel.register(s, selectors.EVENT_READ)
        socks[s] = 0

    def drop(s: socket.socket) -> None:
        sel.unregister(s)
        socks.pop(s, None)
        s.close()

    for _ in range(count):
        connect()
    ready.set()
    next_byte = time.monotonic()
    reconnects = 0
    while not stop.is_set():
        for key, _ in sel.select(0.05):
            try:
                key.fileobj.recv(4096)
            except OSError:
                pass
            drop(key.fileobj)  # the server answered (503 to make room, 408) or closed: come back
        missing = count - len(socks)
        if missing > 0:
            reconnects += missing
            for _ in range(missing):
                connect()
        if mode == "slow" and time.monotonic() >= next_byte:
            next_byte = time.monotonic() + 0.5  # every connection sends one more byte every 0.5 s
            for s, sent in list(socks.items()):
                try:
                    if s.send(head[sent % len(head) : sent % len(head) + 1]):
                        socks[s] = sent + 1
                except BlockingIOError:
                    pass
                except OSError:
                    drop(s)
    for s in list(socks):
        s.close()
    print(f"    flooder ({mode}): {reconnects} reconnects after the server closed a connection", flush=True)


def linger_flooder(address, rate: float, hold: float, ready, stop, sent) -> None:
    """Requests without the secret, announcing a body that never comes, at ``rate`` a second from
    4 threads; each connection is closed ``hold`` seconds after it was opened, whatever the server
    does. ``sent`` (a shared counter) counts them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    heads = [
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n".encode()
        for target in (f"/webhook/{'x' * 24}", "/healthz", "/wp-login.php")
    ]
    senders = 4

    def sender(i: int) -> None:
        held: list[tuple[float, socket.socket]] = []
        next_at = time.monotonic()
        n = i
        while not stop.is_set():
            now = time.monotonic()
            while held and now - held[0][0] > hold:
                held.pop(0)[1].close()
            if now < next_at:
                time.sleep(min(0.05, next_at - now))
                continue
            next_at += senders / rate
            try:
                s = socket.create_connection(address, timeout=2)
                s.sendall(heads[n % len(heads)])
            except OSError:
                continue
            n += 1
            held.append((now, s))
            with sent.get_lock():
                sent.value += 1
        for _, s in held:
            s.close()

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(senders)]
    for t in threads:
        t.start()
    ready.set()
    for t in threads:
        t.join()


# -- the webhook sender --------------------------------------------------------------------------
def send_webhooks(address, seconds: float, rate: float, first_id: int) -> tuple[list[float], list[str]]:
    """Webhooks at ``rate`` per second, each in a thread of its own (as amoCRM's senders are independent)."""
    base = bodies()
    path = f"/webhook/{SECRET}"
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def one(n: int) -> None:
        data = request_bytes(path, unique(base[n % len(base)], n))
        started = time.perf_counter()
        try:
            with socket.create_connection(address, timeout=10) as sock:
                sock.sendall(data)
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
            status = answer.split(b" ", 2)[1].decode() if answer else "no answer"
        except OSError as exc:
            status = type(exc).__name__
        took = time.perf_counter() - started
        with lock:
            if status == "200":
                latencies.append(took)
            else:
                failures.append(status)

    threads = []
    stop_at = time.monotonic() + seconds
    n = first_id
    while time.monotonic() < stop_at:
        t = threading.Thread(target=one, args=(n,))
        t.start()
        threads.append(t)
        n += 1
        time.sleep(1.0 / rate)
    for t in threads:
        t.join(15)
    return sorted(latencies), failures


# -- the server ----------------------------------------------------------------------------------
def proc_figures(pid: int) -> dict:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {
        "threads": int(status["Threads"]),
        "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
        "cpu": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"),
    }


def checkout(rev: str, into: Path) -> Path:
    """The ``amohook`` package as it is at git revision ``rev``, unpacked under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "amohook"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise SystemExit(f"cannot read revision {rev!r}: {archive.stderr.decode(errors='replace').strip()}")
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def start_serve(db_path: Path, code: Path = ROOT) -> tuple[subprocess.Popen, tuple[str, int]]:
    """`amohook serve` from the package under ``code`` (this checkout by default)."""

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))

    env = {k: v for k, v in os.environ.items() if not k.startswith("AMOHOOK_")}
    env.update(AMOHOOK_DB_URL=f"sqlite:///{db_path}", AMOHOOK_WEBHOOK_SECRET=SECRET, PYTHONPATH=str(code))
    proc = subprocess.Popen(
        [sys.executable, "-m", "amohook", "serve", "--port", "0", "--workers", "0", "--log-level", "error"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(code),
        preexec_fn=limit,
    )
    line = proc.stdout.readline()
    match = re.search(r"listening on http://([\d.]+):(\d+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r} {proc.stderr.read()}")
    return proc, (match.group(1), int(match.group(2)))


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * p / 100))] * 1000


def phase(address, pid: int, mode: str, args, first_id: int) -> dict:
    ctx = multiprocessing.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    sent = ctx.Value("l", 0)
    flood = None
    if mode == "linger":
        flood = ctx.Process(target=linger_flooder, args=(address, args.linger_rate, 2.0, ready, stop, sent))
    elif mode != "quiet":
        flood = ctx.Process(target=flooder, args=(address, mode, args.connections, ready, stop))
    if flood is not None:
        flood.start()
        ready.wait(30)
        time.sleep(1.0)  # let the server take them in (linger: let the flood reach its pace)
    before = proc_figures(pid)
    flood_before, started = sent.value, time.monotonic()
    peak = [before["threads"]]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.1):
            try:
                peak[0] = max(peak[0], proc_figures(pid)["threads"])
            except (OSError, KeyError, ValueError):
                return

    sampler = threading.Thread(target=sample)
    sampler.start()
    latencies, failures = send_webhooks(address, args.seconds, args.rate, first_id)
    sampling.set()
    sampler.join()
    after = proc_figures(pid)
    flood_rate = (sent.value - flood_before) / (time.monotonic() - started)
    if flood is not None:
        stop.set()
        flood.join(30)
    return {
        "ok": len(latencies),
        "in_time": sum(1 for took in latencies if took < 2.0),
        "failures": failures,
        "p50": pct(latencies, 50),
        "p99": pct(latencies, 99),
        "max": latencies[-1] * 1000 if latencies else float("nan"),
        "threads": after["threads"],
        "peak_threads": peak[0],
        "rss_mib": after["rss_mib"],
        "cpu_pct": 100 * (after["cpu"] - before["cpu"]) / args.seconds,
        "flood_rate": flood_rate,
    }


def print_row(label: str, r: dict) -> None:
    bad = f", non-200: {len(r['failures'])} ({', '.join(sorted(set(r['failures'])))})" if r["failures"] else ""
    flood = f" | flood {r['flood_rate']:.0f}/s" if r["flood_rate"] else ""
    print(
        f"{label}: webhooks {r['ok']:4} ok ({r['in_time']} within 2 s), "
        f"p50 {r['p50']:6.1f} ms, p99 {r['p99']:6.1f} ms, max {r['max']:6.1f} ms{bad} | server: {r['threads']} threads "
        f"(peak {r['peak_threads']}), {r['rss_mib']:.0f} MiB, CPU {r['cpu_pct']:.0f}%{flood}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="webhook sending time per phase")
    parser.add_argument("--connections", type=int, default=2000, help="flood connections held open")
    parser.add_argument("--rate", type=float, default=20.0, help="real webhooks per second during each phase")
    parser.add_argument("--linger-rate", type=float, default=300.0, help="secretless POSTs per second (linger)")
    parser.add_argument("--baseline", metavar="REV", help="also run each phase against this git revision")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # for our own client sockets
    tmp = Path(tempfile.mkdtemp(prefix="amohook-flood-"))
    servers = {"": start_serve(tmp / "flood.db")}
    modes = ["quiet", "idle", "slow", "linger"]
    if args.baseline:
        servers[args.baseline] = start_serve(tmp / "baseline.db", checkout(args.baseline, tmp / "baseline"))
    print(
        f"{os.cpu_count()} CPUs; amohook serve under ulimit -n {NOFILE}; {args.connections} flood connections; "
        f"{args.linger_rate:g} secretless POSTs/s (linger); {args.rate:g} webhooks/s for {args.seconds:g} s per "
        f"phase; {args.rounds} rounds" + (f"; each phase also against {args.baseline}" if args.baseline else "")
    )
    labels = [label for mode in modes for label in (mode, *([f"{mode}@{args.baseline}"] if args.baseline else []))]
    width = max(map(len, labels))
    rows: list[dict] = []
    next_id = 1
    try:
        for round_no in range(1, args.rounds + 1):
            row = {}
            for label in labels:
                mode, _, rev = label.partition("@")
                proc, address = servers[rev]
                row[label] = phase(address, proc.pid, mode, args, next_id * 1_000_000)
                next_id += 1
                print_row(f"round {round_no} {label:{width}}", row[label])
            rows.append(row)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("medians over rounds:")
    for label in labels:
        med = lambda key, label=label: statistics.median(r[label][key] for r in rows)  # noqa: E731
        failed = sum(len(r[label]["failures"]) for r in rows)
        total = failed + sum(r[label]["ok"] for r in rows)
        in_time = sum(r[label]["in_time"] for r in rows)
        print(
            f"  {label:{width}}: p50 {med('p50'):6.1f} ms, p99 {med('p99'):6.1f} ms, max {med('max'):6.1f} ms, "
            f"200 within 2 s {in_time} of {total}, non-200 {failed} | server {med('threads'):.0f} threads "
            f"(peak {med('peak_threads'):.0f}), {med('rss_mib'):.0f} MiB, CPU {med('cpu_pct'):.0f}%"
            + (f" | flood {med('flood_rate'):.0f}/s" if label.startswith("linger") else "")
        )
    if args.baseline:
        for mode in modes:
            new, old = (statistics.median(r[k]["p99"] for r in rows) for k in (mode, f"{mode}@{args.baseline}"))
            print(f"{mode:6} p99: {new:.0f} ms against {old:.0f} ms at {args.baseline} ({new / old:.2f}x)")
    worst = max(statistics.median(r[m]["p99"] for r in rows) for m in ("idle", "slow", "linger"))
    print(f"aim: p99 under 1000 ms while flooded — {'met' if worst < 1000 else 'NOT met'} ({worst:.0f} ms)")


if __name__ == "__main__":
    main()
