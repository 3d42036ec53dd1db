"""The README tells the truth: every command has help and is documented, every exit code too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from amohook.errors import ExitCode
from tests.helpers.commands import all_commands

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_command_has_help_and_is_in_the_readme():
    commands = dict(all_commands())
    assert {"init-auth", "auth-url", "refresh-token", "status"} <= set(commands)
    for name, command in commands.items():
        assert (command.help or "").strip(), f"`amohook {name}` has no help text"
        assert f"amohook {name}" in README, f"`amohook {name}` is not documented in README.md"


def test_every_exit_code_is_documented():
    for code in ExitCode:
        assert f"| {int(code)} | `{code.name}` |" in README, f"exit code {code.name} missing from README.md"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in README
    assert "python -m pytest -q" in ci


def test_the_readme_rules_example_is_the_tested_file():
    example = (ROOT / "examples" / "rules.toml").read_text(encoding="utf-8")
    body = example.split("\n", 1)[1]  # without the file's first comment line
    assert body in README


@pytest.mark.slow
def test_the_readme_listener_lines_give_the_first_task(tmp_path, fake):
    """The quick start's listener lines, as written (the port moved to a free one), after its
    steps 2-4 (connect, sync, rules.toml in the working directory): `serve` with no secret
    configured, `webhooks url` prints the URL it answers, and a stage change delivered there is a
    task in amoCRM — step 6's "within a second, with the listener"."""
    import os
    import re
    import shutil
    import subprocess
    import sys
    import time

    import requests

    pipeline = fake.add_pipeline("Sales", ["New", "Qualified"])
    stages = {s["name"]: s["id"] for s in pipeline["_embedded"]["statuses"]}
    fake.add_task_type("Call")
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in quick.split("```sh")[1:]]
    [run_line] = [line for b in blocks for line in b.splitlines() if line.startswith("amohook serve")]
    [url_line] = [line for b in blocks for line in b.splitlines() if line.startswith("amohook webhooks url")]
    python = f"{sys.executable} -m amohook"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMOHOOK_")}
    env.update(HOME=str(tmp_path), AMOHOOK_PORT="0", PYTHONPATH=str(ROOT))
    for name in ("XDG_DATA_HOME", "STATE_DIRECTORY", "JOURNAL_STREAM"):
        env.pop(name, None)

    def run(line: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", line.replace("amohook", python, 1)],
            env={**env, **extra},
            cwd=str(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )

    connect = (
        f"amohook init-auth --subdomain example --base-url {fake.base_url} "
        f"--client-id {fake.client_id} --redirect-uri {fake.redirect_uri}"
    )
    secrets = dict(AMOHOOK_CLIENT_SECRET=fake.client_secret, AMOHOOK_AUTH_CODE=fake.issue_code())
    done = run(connect, **secrets)
    assert done.returncode == 0, done.stderr
    assert run("amohook sync-entities").returncode == 0
    shutil.copy(ROOT / "examples" / "rules.toml", tmp_path / "rules.toml")
    proc = subprocess.Popen(
        ["bash", "-c", run_line.replace("amohook", python, 1)],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, line + proc.stderr.read()
        health = requests.get(match.group(1) + "/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["database"] == "ok"
        assert (tmp_path / ".local" / "share" / "amohook" / "amohook.db").exists()
        printed = run(url_line)
        assert printed.returncode == 0, printed.stderr
        [url] = printed.stdout.splitlines()
        assert url.startswith("https://hooks.example.com/webhook/")
        path = url.removeprefix("https://hooks.example.com")
        fake.add_lead("Acme", pipeline["id"], stages["New"], fake.account["current_user_id"], lead_id=7001)
        body = fake.webhook_body("status", [fake.move_lead(7001, stages["Qualified"], pipeline["id"])])
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        answer = requests.post(match.group(1) + path, data=body, headers=form, timeout=5)
        assert answer.status_code == 200
        deadline = time.time() + 30
        while not fake.tasks and time.time() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        _, log = proc.communicate(timeout=15)
    assert [(t["entity_id"], t["text"]) for t in fake.tasks.values()] == [(7001, "Call Acme about the offer")], log


def test_the_readme_keeps_secrets_off_command_lines_and_out_of_the_units():
    """An authorization code on a command line is in `ps` for its 20 minutes; a secret in a
    unit's Environment= is readable by every user (and printed by `systemctl show`)."""
    import re

    assert not re.search(r"--code\s+['\"]?[\w…]", README), "the README passes a literal code with --code"
    assert "Environment=AMOHOOK_WEBHOOK_SECRET" not in README
    assert "AMOHOOK_AUTH_CODE" in README and "hidden prompt" in README
    for unit in sorted((ROOT / "deploy" / "systemd").glob("*.service")):
        text = unit.read_text()
        assert "EnvironmentFile=/etc/amohook/amohook.env" in text, unit.name
        assert not re.search(r"^Environment=.*(SECRET|PASSWORD|TOKEN|DB_URL)", text, re.M), unit.name


def test_the_readme_service_setup_makes_private_files(tmp_path):
    """The commands that create /etc/amohook and /var/lib/amohook, run as written (into a
    temporary directory, without sudo and the owners)."""
    import os
    import stat
    import subprocess

    section = README.split("## From the quick start to a service", 1)[1].split("\n## ", 1)[0]
    block = section.split("**1. The user", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("sudo install")]
    script = "\n".join(lines).replace("sudo ", "")
    script = re.sub(r"-o \w+ -g \w+ ", "", script)
    script = script.replace("/etc/amohook", str(tmp_path / "etc")).replace("/var/lib/amohook", str(tmp_path / "state"))
    (tmp_path / "rules.toml").write_text("")
    subprocess.run(["sh", "-ec", script], check=True, timeout=30, cwd=str(tmp_path))

    def mode(path):
        return stat.S_IMODE(os.stat(tmp_path / path).st_mode)

    assert (mode("etc/amohook.env"), mode("etc/rules.toml"), mode("state")) == (0o600, 0o640, 0o700)


def test_the_readme_python_snippet_runs_the_rules_against_the_fake(store, fake, crm, tmp_path):
    """The "Use it from Python" block, as written (the port moved to a free one), in its own
    process: a webhook in, the rule's task and the handler's call out, and SIGTERM stops it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import requests

    from tests.helpers.e2e import FORM, stage_body

    block = README.split("## Use it from Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "port=8080" in block
    prelude = f"""
import threading, time
DATABASE_URL = {store.url!r}
WEBHOOK_SECRET = "python-snippet-secret-0123456789"

def my_handler(event, ctx):
    print("handled", event.entity, event.action, event.entity_id, flush=True)

def announce():  # the test needs the listener's address
    while True:
        runner = globals().get("runner")
        if runner is not None and runner.service is not None and runner.service.httpd is not None:
            print("url", runner.url, flush=True)
            return
        time.sleep(0.02)

threading.Thread(target=announce, daemon=True).start()
"""
    script = tmp_path / "snippet.py"
    script.write_text(prelude + block.replace("port=8080", "port=0"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMOHOOK_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=str(tmp_path),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("url "), line + proc.stderr.read()
        url = line.split()[1]
        answer = requests.post(
            f"{url}/webhook/python-snippet-secret-0123456789", data=stage_body(crm), headers=FORM, timeout=5
        )
        assert answer.status_code == 200
        assert proc.stdout.readline().split() == ["handled", "leads", "status", "5001"]
        deadline = time.time() + 20
        while not fake.tasks and time.time() < deadline:
            time.sleep(0.05)
        [task] = fake.tasks.values()
        assert task["text"] == "Call Acme about the offer" and task["entity_id"] == 5001
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
