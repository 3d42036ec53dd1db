"""One time format for scripts and one for people (issue 14 #7, issue 16 #4): every `--json` gives
times as ISO 8601 with a zone, never epoch numbers; people read local time with the zone's name."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from amohook.times import human_time, iso_time
from tests.conftest import run_cli

ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(Z|[+-]\d{2}:\d{2})$")
TIME_KEY = re.compile(r"(_at|_from|_to|_until)$")


def times_in(data, path: str = "") -> list[tuple[str, object]]:
    """Every value under a key that names a point in time (…_at, …_from, …_to, …_until)."""
    found: list[tuple[str, object]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}"
            if TIME_KEY.search(str(key)) and not isinstance(value, dict | list):
                found.append((where, value))
            else:
                found += times_in(value, where)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += times_in(value, f"{path}[{i}]")
    return found


def test_every_json_time_is_iso_8601_with_a_zone(store, fake, crm):
    lead = fake.add_lead("Acme", crm["pipeline"], crm["new"], crm["anna"], lead_id=7001)
    fake.move_lead(lead["id"], crm["qualified"], crm["pipeline"])
    outputs = {}
    for args in (
        ["reconcile", "--json", "--since", "1h"],
        ["status", "--json"],
        ["events", "list", "--json"],
        ["events", "show", "1", "--json"],
        ["doctor", "--json"],
    ):
        result = run_cli(args, store.url)
        assert result.returncode in (0, 6, 7), (args, result.stderr)
        outputs[" ".join(args)] = json.loads(result.stdout)
    seen = 0
    for command, data in outputs.items():
        for where, value in times_in(data):
            assert value is None or (isinstance(value, str) and ISO.match(value)), (command, where, value)
            seen += value is not None
    reconciled = outputs["reconcile --json --since 1h"][0]
    assert ISO.match(reconciled["window_from"]) and ISO.match(reconciled["window_to"]), reconciled
    assert seen >= 8


def test_the_two_formats():
    ts = 1_765_045_925.7  # 2025-12-06T18:32:05Z
    assert iso_time(ts) == "2025-12-06T18:32:05Z" and iso_time(None) is None
    assert human_time(ts) == time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))
    assert human_time(None) == "—"


def test_one_time_formatter_per_job():
    """Issue 16 #4: amohook/times.py is the only module that turns a time into text."""
    package = Path(__file__).resolve().parents[2] / "amohook"
    offenders = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in package.rglob("*.py")
        if path.name != "times.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "strftime(" in line or "isoformat(" in line and "value.isoformat()" not in line
    ]
    assert not offenders, "\n".join(offenders)
