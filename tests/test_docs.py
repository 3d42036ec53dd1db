"""The README tells the truth: every command has help and is documented, every exit code too."""

from __future__ import annotations

from pathlib import Path

from amohook.errors import ExitCode
from tests.test_rules_e2e import crm  # noqa: F401 (the fake account with a Sales pipeline, as a fixture)

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def all_commands():
    import typer.main

    from amohook.cli.app import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            for sub, subcommand in command.commands.items():
                yield f"{name} {sub}", subcommand
        else:
            yield name, command


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


def test_the_readme_run_command_starts_serve_on_the_sqlite_default(tmp_path):
    """The quick start's listener line, as written (the port moved to a free one)."""
    import os
    import re
    import subprocess
    import sys

    import requests

    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in quick.split("```sh")[1:]]
    [run_line] = [line for b in blocks for line in b.splitlines() if "amohook serve" in line]
    command = run_line.replace(".venv/bin/amohook", f"{sys.executable} -m amohook")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMOHOOK_")}
    env.update(HOME=str(tmp_path), AMOHOOK_PORT="0", PYTHONPATH=str(ROOT))
    env.pop("XDG_DATA_HOME", None)
    proc = subprocess.Popen(
        ["bash", "-c", command], env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, line + proc.stderr.read()
        health = requests.get(match.group(1) + "/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["database"] == "ok"
        assert (tmp_path / ".local" / "share" / "amohook" / "amohook.db").exists()
    finally:
        proc.terminate()
        proc.wait(15)


def test_the_readme_keeps_secrets_off_command_lines_and_out_of_the_unit():
    """An authorization code on a command line is in `ps` for its 20 minutes; a secret in the
    unit's Environment= is readable by every user (and printed by `systemctl show`)."""
    import re

    assert not re.search(r"--code\s+['\"]?[\w…]", README), "the README passes a literal code with --code"
    assert "Environment=AMOHOOK_WEBHOOK_SECRET" not in README
    assert "AMOHOOK_AUTH_CODE" in README and "hidden prompt" in README
    unit = README.split("# /etc/systemd/system/amohook.service", 1)[1].split("```", 1)[0]
    assert "EnvironmentFile=/etc/amohook/amohook.env" in unit


def test_the_readme_env_file_commands_make_a_private_file_with_a_usable_secret(tmp_path):
    """The commands that create /etc/amohook/amohook.env, run as written (into a temporary
    directory, without sudo, chown or systemctl)."""
    import os
    import stat
    import subprocess

    from amohook.webhooks.server import check_secret

    block = README.split("sudo install -d -m 0755 /etc/amohook", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("sudo ") and "systemctl" not in line]
    script = "\n".join(lines).replace("sudo ", "").replace("-o root -g root ", "")
    script = script.replace("/etc/amohook", str(tmp_path))
    subprocess.run(["sh", "-ec", script], check=True, timeout=30)
    env_file = tmp_path / "amohook.env"
    assert stat.S_IMODE(os.stat(env_file).st_mode) == 0o600
    [line] = env_file.read_text().splitlines()
    name, _, value = line.partition("=")
    assert name == "AMOHOOK_WEBHOOK_SECRET" and check_secret(value) == value


def test_the_readme_python_snippet_runs_the_rules_against_the_fake(store, fake, crm, tmp_path):  # noqa: F811 (crm is a fixture)
    """The "Use it from Python" block, as written (the port moved to a free one), in its own
    process: a webhook in, the rule's task and the handler's call out, and SIGTERM stops it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import requests

    from tests.test_rules_e2e import FORM, stage_body

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
