"""The production path (#14.1): the unit files in deploy/systemd/ are hardened and valid, the README
shows them and crontab.example as they are, and the path the README describes — commands run for
the service's store, the units' own commands — works on SQLite against the fake amoCRM, with
everything in $STATE_DIRECTORY/amohook.db."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from amohook.settings import resolve_db_url
from tests.conftest import ROOT

UNITS = ROOT / "deploy" / "systemd"
README = (ROOT / "README.md").read_text(encoding="utf-8")
CRONTAB = (ROOT / "crontab.example").read_text(encoding="utf-8")
SECTION = README.split("## From the quick start to a service", 1)[1].split("\n## ", 1)[0]
EXEC = "/opt/amohook/.venv/bin/amohook"
MAX_EXPOSURE = 2.0
# CI sets this where systemd-analyze is installed, so a missing tool fails instead of skipping.
REQUIRE_TOOLS = os.environ.get("AMOHOOK_REQUIRE_DEPLOY_TOOLS") == "1"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (Debian: apt-get install {'systemd' if 'systemd' in name else name})"
        if REQUIRE_TOOLS:
            pytest.fail(f"{reason}, but AMOHOOK_REQUIRE_DEPLOY_TOOLS=1")
        pytest.skip(reason)
    return path


def services() -> list[Path]:
    return sorted(UNITS.glob("*.service"))


def unit_lines(path: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in path.read_text().splitlines() if line.startswith(key + "=")]


# --- where the store is ------------------------------------------------------------------------


def test_state_directory_is_the_default_store_and_explicit_settings_win():
    home = {"HOME": "/home/u"}
    assert resolve_db_url(None, {**home, "STATE_DIRECTORY": "/var/lib/amohook"}) == (
        "sqlite:////var/lib/amohook/amohook.db"
    )
    # systemd joins several StateDirectory= entries with ':'; the first is amohook's.
    assert resolve_db_url(None, {"STATE_DIRECTORY": "/var/lib/amohook:/var/lib/other"}) == (
        "sqlite:////var/lib/amohook/amohook.db"
    )
    state = {"STATE_DIRECTORY": "/var/lib/amohook"}
    assert resolve_db_url(None, {**state, "AMOHOOK_DATA_DIR": "/srv/a"}) == "sqlite:////srv/a/amohook.db"
    assert resolve_db_url(None, {**state, "AMOHOOK_DB_URL": "sqlite:////x/y.db"}) == "sqlite:////x/y.db"
    assert resolve_db_url("sqlite:////f/g.db", {**state, "AMOHOOK_DB_URL": "sqlite:////x/y.db"}) == "sqlite:////f/g.db"
    assert resolve_db_url(None, {"XDG_DATA_HOME": "/xdg", "STATE_DIRECTORY": ""}) == "sqlite:////xdg/amohook/amohook.db"


# --- the unit files ----------------------------------------------------------------------------


def test_every_unit_is_for_the_service_user_its_store_and_the_network():
    assert {p.name for p in services()} == {
        "amohook-serve.service",
        "amohook-worker.service",
        "amohook-refresh-token.service",
        "amohook-sync-entities.service",
        "amohook-doctor.service",
    }
    for unit in services():
        text = unit.read_text()
        for line in (
            "User=amohook",
            "StateDirectory=amohook",
            "StateDirectoryMode=0700",
            "UMask=0077",
            "EnvironmentFile=/etc/amohook/amohook.env",
            "Wants=network-online.target",
            "After=network-online.target",
        ):
            assert line in text.splitlines(), f"{unit.name}: no {line}"
        [command] = unit_lines(unit, "ExecStart")
        assert command.startswith(EXEC + " "), unit.name
    for timer in sorted(UNITS.glob("*.timer")):
        assert (UNITS / timer.name.replace(".timer", ".service")).exists(), timer.name
        assert "Type=oneshot" in (UNITS / timer.name.replace(".timer", ".service")).read_text()


def exposure(analyze: str, unit: Path) -> float:
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.parametrize("unit", services(), ids=lambda p: p.name)
def test_each_service_is_rated_2_or_better_by_systemd_analyze_security(unit):
    score = exposure(tool("systemd-analyze"), unit)
    assert score <= MAX_EXPOSURE, f"{unit.name}: exposure {score} (want {MAX_EXPOSURE} or better)"


def test_the_security_check_can_fail(tmp_path):
    """An unhardened copy of the listener scores far worse: the parse above reads the real figure."""
    analyze = tool("systemd-analyze")
    bare = tmp_path / "amohook-serve.service"
    text = (UNITS / "amohook-serve.service").read_text().split("\n# Hardening", 1)[0]
    bare.write_text(text + "\n[Install]\nWantedBy=multi-user.target\n")
    assert exposure(analyze, bare) > 5


def test_systemd_analyze_verify_passes_on_every_unit(tmp_path):
    """verify checks that ExecStart= exists: the copies run this test's Python (`-m amohook`)
    instead of /opt/amohook/.venv, and nothing else changes. Any warning (an unknown key, a
    misspelt value) is a failure too: verify itself exits 0 for those."""
    analyze = tool("systemd-analyze")
    copies = []
    for unit in sorted(UNITS.iterdir()):
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace(EXEC, f"{sys.executable} -m amohook"))
        copies.append(str(copy))
    result = subprocess.run(
        [analyze, "verify", "--man=no", *copies], capture_output=True, text=True, timeout=120, cwd=str(tmp_path)
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_verify_notices_a_misspelt_key(tmp_path):
    analyze = tool("systemd-analyze")
    copy = tmp_path / "amohook-serve.service"
    text = (UNITS / "amohook-serve.service").read_text().replace(EXEC, f"{sys.executable} -m amohook")
    copy.write_text(text.replace("PrivateTmp=", "PrivateTpm="))
    result = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    assert "PrivateTpm" in result.stderr


# --- the README shows the files as they are ----------------------------------------------------


def test_the_readme_unit_copies_are_the_files():
    shown = re.findall(r"`deploy/systemd/([\w.-]+)`:\n\n```ini\n(.*?)```", README, re.S)
    assert {name for name, _ in shown} >= {"amohook-serve.service", "amohook-refresh-token.timer"}
    for name, text in shown:
        assert text == (UNITS / name).read_text(), f"README's copy of deploy/systemd/{name} differs from the file"
    for unit in UNITS.iterdir():
        assert unit.name.removeprefix("amohook-").split(".")[0] in SECTION, f"{unit.name} is not in the README"


def test_one_cron_set_and_it_is_crontab_example():
    blocks = re.findall(r"```cron\n(.*?)```", README, re.S)
    assert blocks == [CRONTAB], "README's cron lines must be crontab.example, once"
    assert "crontab.example" in SECTION


def cron_jobs() -> dict[str, str]:
    """{amohook command: schedule} from crontab.example."""
    jobs = {}
    for line in CRONTAB.splitlines():
        if line[:1].isdigit() or line.startswith("*"):
            fields = line.split()
            assert fields[5] == EXEC, line
            jobs[" ".join(fields[6:8])] = " ".join(fields[:5])
    return jobs


def cron_times(schedule: str, start: float, count: int) -> list[str]:
    """The next ``count`` minutes (UTC) matching a cron line's minute and hour fields (day, month
    and weekday are ``*`` in crontab.example)."""
    minute, hour, *rest = schedule.split()
    assert rest == ["*", "*", "*"], schedule

    def matches(field: str, value: int) -> bool:
        if field == "*":
            return True
        if field.startswith("*/"):
            return value % int(field[2:]) == 0
        return value == int(field)

    times: list[str] = []
    t = int(start) // 60 * 60 + 60
    while len(times) < count:
        tm = time.gmtime(t)
        if matches(minute, tm.tm_min) and matches(hour, tm.tm_hour):
            times.append(time.strftime("%Y-%m-%d %H:%M:%S", tm))
        t += 60
    return times


def test_the_timers_run_what_crontab_example_runs_when_it_runs():
    analyze = tool("systemd-analyze")
    jobs = cron_jobs()
    timers = sorted(UNITS.glob("*.timer"))
    assert len(timers) == len(jobs) == 3
    base = 1_767_225_600 + 10 * 60  # 2026-01-01 00:10 UTC
    for timer in timers:
        service = UNITS / timer.name.replace(".timer", ".service")
        [command] = unit_lines(service, "ExecStart")
        name = " ".join(command.split()[1:3])
        assert name in jobs, f"{service.name} runs `{name}`, which crontab.example does not"
        [calendar] = unit_lines(timer, "OnCalendar")
        result = subprocess.run(
            [analyze, "calendar", "--iterations=30", f"--base-time=@{base}", calendar],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "TZ": "UTC"},
        )
        assert result.returncode == 0, result.stderr
        elapses = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\S+ \S+) UTC", result.stdout)
        assert elapses == cron_times(jobs[name], base, 30), f"{timer.name} and crontab.example disagree"
    # The jobs' options are the same too (doctor's rules come from AMOHOOK_RULES in the unit).
    for service in ("refresh-token", "sync-entities"):
        [command] = unit_lines(UNITS / f"amohook-{service}.service", "ExecStart")
        assert any(line.endswith(command) for line in CRONTAB.splitlines()), service


# --- the README's path, walked on SQLite -------------------------------------------------------


def svc_function(state: Path) -> str:
    """The README's `svc` shell function, for this test: without sudo (the test's user stands for
    `amohook`), this Python instead of /opt/amohook/.venv, a temporary state directory."""
    [line] = [line for line in SECTION.splitlines() if line.startswith("svc() {")]
    assert "sudo -u amohook env STATE_DIRECTORY=/var/lib/amohook " + EXEC in line
    return (
        line.replace("sudo -u amohook ", "")
        .replace("/var/lib/amohook", str(state))
        .replace(EXEC, f"{sys.executable} -m amohook")
    )


def base_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMOHOOK_")}
    for name in ("XDG_DATA_HOME", "STATE_DIRECTORY", "JOURNAL_STREAM"):
        env.pop(name, None)
    env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    return env


def svc(state: Path, home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    script = svc_function(state) + '\nsvc "$@"'
    return subprocess.run(
        ["bash", "-c", script, "svc", *args],
        env={**base_env(home), **env},
        cwd=str(home),
        capture_output=True,
        text=True,
        timeout=120,
    )


def unit_command(name: str, state: Path, rules: Path, *extra: str) -> tuple[list[str], dict]:
    """A unit's ExecStart= and Environment=, as systemd would run them (paths moved to the test's)."""
    unit = UNITS / f"amohook-{name}.service"
    [command] = unit_lines(unit, "ExecStart")
    args = [sys.executable, "-m", "amohook", *command.split()[1:], *extra]
    env = {"STATE_DIRECTORY": str(state)}
    for assignment in unit_lines(unit, "Environment"):
        key, _, value = assignment.partition("=")
        env[key] = value.replace("/etc/amohook/rules.toml", str(rules))
    return args, env


def run_unit(name: str, state: Path, home: Path, rules: Path, *extra: str) -> subprocess.CompletedProcess:
    args, env = unit_command(name, state, rules, *extra)
    return subprocess.run(
        args, env={**base_env(home), **env}, cwd=str(state), capture_output=True, text=True, timeout=120
    )


class Unit:
    """A long-running unit (serve, worker) started as systemd would, on a free port."""

    def __init__(self, name: str, state: Path, home: Path, rules: Path):
        args, env = unit_command(name, state, rules)
        self.proc = subprocess.Popen(
            args,
            env={**base_env(home), **env, "AMOHOOK_PORT": "0"},
            cwd=str(state),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.line = self.proc.stdout.readline()

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=20)
        return err


@pytest.fixture
def place(tmp_path, fake):
    """A home directory, the service's state directory (made as the README makes it), a rules
    file, and the fake account's pipeline, task type and user."""
    home, state = tmp_path / "home", tmp_path / "state"
    home.mkdir()
    state.mkdir(mode=0o700)
    pipeline = fake.add_pipeline("Sales", ["New", "Qualified"])
    stages = {s["name"]: s["id"] for s in pipeline["_embedded"]["statuses"]}
    fake.add_task_type("Call")
    anna = fake.add_user("Anna", "anna@example.com")
    rules = tmp_path / "rules.toml"
    rules.write_text((ROOT / "examples" / "rules.toml").read_text(encoding="utf-8"))
    return dict(home=home, state=state, rules=rules, pipeline=pipeline["id"], stages=stages, anna=anna["id"])


def init_auth_args(fake) -> list[str]:
    return [
        "init-auth",
        "--subdomain",
        "example",
        "--base-url",
        fake.base_url,
        "--client-id",
        fake.client_id,
        "--redirect-uri",
        fake.redirect_uri,
    ]


def move(fake, place, lead_id: int) -> dict:
    fake.add_lead(f"Lead {lead_id}", place["pipeline"], place["stages"]["New"], place["anna"], lead_id=lead_id)
    return fake.move_lead(lead_id, place["stages"]["Qualified"], place["pipeline"])


@pytest.mark.slow  # the README's whole path, a dozen processes: about 6 s alone, 20 s on a loaded machine
def test_the_readme_path_on_sqlite_lands_in_the_state_directory(fake, place):
    home, state, rules = place["home"], place["state"], place["rules"]
    secrets = dict(AMOHOOK_CLIENT_SECRET=fake.client_secret, AMOHOOK_AUTH_CODE=fake.issue_code())
    done = svc(state, home, *init_auth_args(fake), **secrets)
    assert done.returncode == 0, done.stderr
    for step in (["sync-entities"], ["rules", "check", "--rules", str(rules)]):
        done = svc(state, home, *step)
        assert done.returncode == 0, done.stderr
    store = state / "amohook.db"
    assert store.exists() and oct(store.stat().st_mode & 0o777) == "0o600"

    # The timers' jobs, as their units run them: quiet when all is well.
    for job in ("refresh-token", "sync-entities", "doctor"):
        done = run_unit(job, state, home, rules)
        assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), job

    # Worker-only: a stage change found in the events log becomes a task.
    time.sleep(1.1)  # the change comes after the account was connected (amoCRM's times are seconds)
    move(fake, place, 7001)
    done = run_unit("worker", state, home, rules, "--once")
    assert done.returncode == 0, done.stderr
    assert [t["entity_id"] for t in fake.tasks.values()] == [7001]

    # The listener: started as its unit starts it; `webhooks url` prints the URL it answers.
    serve = Unit("serve", state, home, rules)
    try:
        assert "listening on" in serve.line, serve.line + serve.stop()
        local = serve.line.split("listening on ", 1)[1].strip()
        printed = svc(state, home, "webhooks", "url", "--public-url", "https://hooks.example.com")
        assert printed.returncode == 0, printed.stderr
        path = printed.stdout.strip().removeprefix("https://hooks.example.com")
        body = fake.webhook_body("status", [move(fake, place, 7002)])
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        assert requests.post(local + path, data=body, headers=form, timeout=5).status_code == 200
        deadline = time.time() + 30
        while len(fake.tasks) < 2 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        log = serve.stop()
    assert sorted(t["entity_id"] for t in fake.tasks.values()) == [7001, 7002], log
    assert path.rsplit("/", 1)[1] not in log
    # One store, the service's: nothing in the home directory, nothing beside it but its WAL files.
    assert not (home / ".local").exists()
    assert {p.name for p in state.iterdir()} <= {"amohook.db", "amohook.db-wal", "amohook.db-shm"}


@pytest.mark.slow  # the README's whole path, a dozen processes: about 6 s alone, 20 s on a loaded machine
def test_the_readme_moves_a_quick_start_store_with_its_webhook_secret(fake, place):
    home, state, rules = place["home"], place["state"], place["rules"]
    sqlite3 = tool("sqlite3")
    env = base_env(home)
    quick = [sys.executable, "-m", "amohook"]
    secrets = dict(AMOHOOK_CLIENT_SECRET=fake.client_secret, AMOHOOK_AUTH_CODE=fake.issue_code())
    done = subprocess.run(
        [*quick, *init_auth_args(fake)], env={**env, **secrets}, cwd=str(home), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    old = home / ".local" / "share" / "amohook" / "amohook.db"
    # The quick start's listener makes the secret; it is stopped before the move, as the README says.
    serve = subprocess.Popen(
        [*quick, "serve", "--port", "0"], env=env, cwd=str(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert b"listening on" in serve.stdout.readline()
    finally:
        serve.terminate()
        serve.wait(20)
    url = [*quick, "webhooks", "url", "--public-url", "https://hooks.example.com"]
    before = subprocess.run(url, env=env, cwd=str(home), capture_output=True, text=True, timeout=60)
    assert before.returncode == 0 and "/webhook/" in before.stdout, before.stderr

    block = SECTION.split("or move the quick-start store", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip()]
    assert lines[0].startswith("sudo sqlite3 ") and "sudo chown amohook:amohook" in lines[1]
    script = "\n".join(lines).replace("sudo chown amohook:amohook /var/lib/amohook/amohook.db && ", "")
    script = script.replace("sudo ", "").replace("sqlite3", sqlite3, 1)
    script = script.replace("~/.local/share/amohook", str(old.parent)).replace("/var/lib/amohook", str(state))
    subprocess.run(["sh", "-ec", script], check=True, timeout=60)
    assert oct((state / "amohook.db").stat().st_mode & 0o777) == "0o600"
    for leftover in old.parent.glob("amohook.db*"):  # "Remove the old file afterwards"
        leftover.unlink()

    # The service's store has the account and the same secret: the URL amoCRM has stays right.
    after = svc(state, home, "webhooks", "url", "--public-url", "https://hooks.example.com")
    assert (after.returncode, after.stdout) == (0, before.stdout), after.stderr
    for step in (["status"], ["sync-entities"], ["rules", "check", "--rules", str(rules)]):
        done = svc(state, home, *step)
        assert done.returncode == 0, done.stderr
