"""Logs an admin can read (issue 11 #5): under systemd every line `serve` writes to stderr starts
with a journald priority (`<4>` warning, `<6>` info, …) and carries no timestamp of ours, so
`journalctl -p warning -u amohook` works; elsewhere the lines keep their timestamp. The SIGTERM and
"stopped" lines go through the same logging. Libraries' debug output only when asked for."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, cli_env
from tests.helpers.deliveries import fixture_body

SECRET = "journal-secret-0123456789abcdef"
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}")
PRIORITY = re.compile(r"^<[0-7]>")

BODY = fixture_body("01_lead_status_2016.txt")
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
pytestmark = pytest.mark.slow  # each test starts `serve` in a process of its own


def journal_env(db_url: str, stderr_file, **extra: str) -> dict:
    """The environment systemd gives a unit whose stderr is the journal: JOURNAL_STREAM names the
    device and inode of that very stream."""
    st = os.fstat(stderr_file.fileno())
    return cli_env(db_url, AMOHOOK_WEBHOOK_SECRET=SECRET, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", **extra)


def plain_env(db_url: str, **extra: str) -> dict:
    env = cli_env(db_url, AMOHOOK_WEBHOOK_SECRET=SECRET, **extra)
    env.pop("JOURNAL_STREAM", None)
    return env


def run_serve(args: list[str], env: dict, stderr_path: Path, work=lambda url: None, until: str | None = None) -> str:
    """Start `serve`, call ``work(url)``, wait for ``until`` in stderr, send SIGTERM; stderr's text."""
    with open(stderr_path, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "amohook", "serve", "--port", "0", *args],
            env=env,
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line + stderr_path.read_text()
        work(line.split("listening on ", 1)[1].strip())
        deadline = time.monotonic() + 20
        while until and until not in stderr_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return stderr_path.read_text()


def near_miss(url: str) -> None:
    requests.get(f"{url}/webhook/not-the-secret", timeout=5)  # logged at info, without the path's secret


def test_under_journald_every_stderr_line_has_a_priority_and_no_timestamp(sqlite_url, tmp_path):
    path = tmp_path / "stderr"
    with open(path, "wb") as f:
        env = journal_env(sqlite_url, f)
    # --workers 1 and no handler: a warning at start; the near miss: an info line.
    text = run_serve(["--workers", "1"], env, path, near_miss)
    lines = [line for line in text.splitlines() if line]
    assert lines, text
    assert all(PRIORITY.match(line) for line in lines), text
    assert not TIMESTAMP.search(text), text
    assert any(line.startswith("<4>") and "no handlers given" in line for line in lines), text
    assert any(line.startswith("<6>") and "/webhook/***" in line for line in lines), text
    assert any(line.startswith("<6>") and "received SIGTERM; stopping" in line for line in lines), text
    assert any(line.startswith("<6>") and line.endswith("stopped") for line in lines), text


def test_without_journald_lines_keep_their_timestamps_and_sigterm_is_logged(sqlite_url, tmp_path):
    text = run_serve(["--workers", "1"], plain_env(sqlite_url), tmp_path / "stderr", near_miss)
    lines = [line for line in text.splitlines() if line]
    assert lines and all(TIMESTAMP.match(line) for line in lines), text
    assert not any(PRIORITY.match(line) for line in lines), text
    assert re.search(r"^\S+ \S+ INFO amohook\S*: received SIGTERM; stopping", text, re.MULTILINE), text


def test_journal_stream_naming_another_stream_is_not_the_journal(sqlite_url, tmp_path):
    """A shell started by a unit inherits JOURNAL_STREAM; `serve 2>file` there writes a file."""
    other = tmp_path / "other"
    with open(other, "wb") as f:
        env = journal_env(sqlite_url, f)
    text = run_serve(["--workers", "0"], env, tmp_path / "stderr", near_miss)
    assert TIMESTAMP.search(text) and not PRIORITY.search(text), text


def test_a_traceback_under_journald_has_the_priority_on_every_line(sqlite_url, tmp_path):
    (tmp_path / "boomhook.py").write_text("def handle(event, ctx):\n    raise RuntimeError('boom in a handler')\n")
    path = tmp_path / "stderr"
    with open(path, "wb") as f:
        env = journal_env(sqlite_url, f, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")

    def post(url: str) -> None:
        assert requests.post(f"{url}/webhook/{SECRET}", data=BODY, headers=FORM, timeout=5).status_code == 200

    text = run_serve(["--workers", "1", "--handler", "boomhook:handle"], env, path, post, until="RuntimeError: boom")
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "Traceback (most recent call last):" in line)
    end = next(i for i in range(start, len(lines)) if "RuntimeError: boom in a handler" in lines[i])
    assert end - start > 2 and all(line.startswith("<4>") for line in lines[start : end + 1]), text
    assert all(PRIORITY.match(line) for line in lines if line), text


def test_an_error_under_journald_has_the_error_priority(sqlite_url, tmp_path):
    path = tmp_path / "stderr"
    with open(path, "wb") as f:
        env = journal_env(sqlite_url, f)
        env["AMOHOOK_WEBHOOK_SECRET"] = "short"
        result = subprocess.run(
            [sys.executable, "-m", "amohook", "serve", "--port", "0"],
            env=env,
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=f,
            text=True,
            timeout=60,
        )
    text = path.read_text()
    assert result.returncode == 2 and text.startswith("<3>error: "), text


def test_library_debug_output_only_when_asked_for_and_still_redacted(sqlite_url, tmp_path):
    def post(url: str) -> None:
        assert requests.post(f"{url}/webhook/{SECRET}", data=BODY, headers=FORM, timeout=5).status_code == 200

    ours = run_serve(["--workers", "0", "--log-level", "debug"], plain_env(sqlite_url), tmp_path / "a", post)
    assert " DEBUG amohook" in ours and " peewee:" not in ours, ours
    env = plain_env(sqlite_url, AMOHOOK_LIBRARY_LOG_LEVEL="debug")
    theirs = run_serve(["--workers", "0", "--log-level", "warning"], env, tmp_path / "b", post)
    assert " DEBUG peewee: " in theirs, theirs  # the library's statements…
    assert " INFO amohook" not in theirs and " DEBUG amohook" not in theirs, theirs  # …not ours at warning
    assert SECRET not in theirs


@pytest.mark.slow
def test_worker_logs_its_start_sigterm_and_stop_with_priorities(sqlite_url, tmp_path):
    (tmp_path / "okhook.py").write_text("def handle(event, ctx):\n    pass\n")
    path = tmp_path / "stderr"
    with open(path, "wb") as err:
        env = journal_env(sqlite_url, err, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "amohook", "worker", "--handler", "okhook:handle"],
            env=env,
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert "worker started" in proc.stdout.readline(), path.read_text()  # stdout keeps it for scripts
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    lines = path.read_text().splitlines()
    assert any(line.startswith("<6>") and "worker started" in line for line in lines), lines
    assert any(line.startswith("<6>") and "received SIGTERM; stopping" in line for line in lines), lines
    assert lines and lines[-1].startswith("<6>") and lines[-1].endswith("stopped"), lines
    assert all(PRIORITY.match(line) for line in lines if line) and not TIMESTAMP.search("\n".join(lines))


@pytest.mark.parametrize("log_level", ["info", "warning"])
def test_under_systemd_listening_on_is_written_once_with_its_priority(sqlite_url, tmp_path, log_level):
    """systemd connects stdout and stderr to one journal stream (StandardOutput=journal, stderr
    inherits): the start line scripts read on stdout must not reach the journal a second time
    without a priority; it is the log line (or, with INFO hidden, stdout's line with <6>)."""
    path = tmp_path / "journal"
    with open(path, "wb") as journal:
        env = journal_env(sqlite_url, journal)
        proc = subprocess.Popen(
            [sys.executable, "-m", "amohook", "serve", "--port", "0", "--workers", "0", "--log-level", log_level],
            env=env,
            cwd=str(ROOT),
            stdout=journal,
            stderr=journal,
        )
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in path.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [line for line in path.read_text().splitlines() if line]
    listening = [line for line in lines if "listening on http://" in line]
    assert len(listening) == 1 and listening[0].startswith("<6>"), lines
    assert all(PRIORITY.match(line) for line in lines), lines
