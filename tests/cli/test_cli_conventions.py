"""Conventions every command keeps (issue 11 #6): `-h` as well as `--help`, shell completion, the
secrets' environment variables named in help (never their values), fixed choices refused with
the list, an unknown event id is a usage error, one JSON shape for an event."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import cli_env, run_cli, run_cli_here
from tests.helpers.commands import all_commands

SECRETS = {
    "AMOHOOK_CLIENT_SECRET": "VALUE-OF-CLIENT-SECRET-4711",
    "AMOHOOK_WEBHOOK_SECRET": "VALUE-OF-WEBHOOK-SECRET-4711",
    "AMOHOOK_LONG_LIVED_TOKEN": "VALUE-OF-LONG-LIVED-TOKEN-4711",
    "AMOHOOK_AUTH_CODE": "VALUE-OF-AUTH-CODE-4711",
}
WIDE = {"COLUMNS": "200"}  # help wraps at the terminal's width; keep each option on one line


def test_every_command_takes_h_as_well_as_help(sqlite_url):
    names = [""] + [name for name, _ in all_commands()] + ["events", "rules", "webhooks"]
    for name in names:
        args = name.split()
        short = run_cli_here([*args, "-h"], sqlite_url, env=cli_env(sqlite_url, **WIDE))  # help: nothing a process adds
        long = run_cli_here([*args, "--help"], sqlite_url, env=cli_env(sqlite_url, **WIDE))
        assert short.returncode == 0 and long.returncode == 0, (name, short.stderr)
        assert short.stdout == long.stdout and "Usage:" in short.stdout, name
        assert any("--help" in line and " -h " in line for line in short.stdout.splitlines()), name


def test_shell_completion_is_on_and_completes_commands(sqlite_url):
    # --show-completion names no shell: typer detects the one it runs under, so run it under bash
    # (not exec'd: bash stays its parent, whatever runs the tests — xdist, CI's script, a terminal).
    shown = subprocess.run(
        ["bash", "-c", '"$0" -m amohook --show-completion; exit $?', sys.executable],
        env=cli_env(sqlite_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0 and "_AMOHOOK_COMPLETE" in shown.stdout, shown.stderr
    env = cli_env(sqlite_url, _AMOHOOK_COMPLETE="complete_bash", COMP_WORDS="amohook eve", COMP_CWORD="1")
    completed = run_cli([], sqlite_url, env=env)
    assert completed.stdout.split() == ["events"], completed.stdout + completed.stderr
    env.update(COMP_WORDS="amohook events list --status d", COMP_CWORD="4")
    assert sorted(run_cli([], sqlite_url, env=env).stdout.split()) == ["dead", "done"]


@pytest.mark.parametrize(
    "command, variables",
    [
        ("init-auth", ["AMOHOOK_CLIENT_SECRET", "AMOHOOK_LONG_LIVED_TOKEN"]),
        ("auth-url", ["AMOHOOK_CLIENT_SECRET"]),
        ("serve", ["AMOHOOK_WEBHOOK_SECRET"]),
    ],
)
def test_help_names_the_secrets_variables_but_never_shows_their_values(sqlite_url, command, variables):
    result = run_cli_here([command, "--help"], sqlite_url, env=cli_env(sqlite_url, **SECRETS, **WIDE))
    assert result.returncode == 0, result.stderr
    for name in variables:
        assert f"env var: {name}" in result.stdout, (name, result.stdout)
    for value in SECRETS.values():
        assert value not in result.stdout + result.stderr
        assert "4711" not in result.stdout


@pytest.mark.parametrize(
    "args, choices",
    [
        (["events", "list", "--status", "nope"], ["pending", "running", "done", "dead"]),
        (["init-auth", "-s", "x", "--domain", "amocrm.org"], ["amocrm.ru", "amocrm.com", "kommo.com"]),
        (
            ["auth-url", "--client-id", "i", "--redirect-uri", "https://x", "--domain", "amocrm.org"],
            ["amocrm.ru", "amocrm.com", "kommo.com"],
        ),
        (["serve", "--log-level", "verbose"], ["debug", "info", "warning", "error"]),
        (["worker", "--library-log-level", "loud"], ["debug", "info", "warning", "error"]),
    ],
)
def test_a_value_outside_a_fixed_choice_is_refused_with_the_choices(sqlite_url, args, choices):
    # Options are parsed before any command runs: nothing a process adds (as for help).
    result = run_cli_here(args, sqlite_url, env=cli_env(sqlite_url, **WIDE))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for choice in choices:
        assert f"'{choice}'" in result.stderr, (choice, result.stderr)
    help_text = run_cli_here(
        [*args[: 2 if args[0] == "events" else 1], "--help"], sqlite_url, env=cli_env(sqlite_url, **WIDE)
    ).stdout
    assert "|".join(choices) in help_text.replace(" ", "")


def test_log_level_from_the_environment_is_checked_and_any_case_is_accepted(sqlite_url):
    bad = run_cli_here(["worker"], sqlite_url, env=cli_env(sqlite_url, AMOHOOK_LOG_LEVEL="verbose"))
    assert bad.returncode == 2 and "AMOHOOK_LOG_LEVEL" in bad.stderr and "'warning'" in bad.stderr, bad.stderr
    upper = run_cli_here(["worker"], sqlite_url, env=cli_env(sqlite_url, AMOHOOK_LOG_LEVEL="DEBUG"))
    assert upper.returncode == 2 and "nothing to run" in upper.stderr, upper.stderr  # DEBUG passed the choice


def test_events_replay_of_an_unknown_id_exits_2_and_queues_nothing(filled):
    result = run_cli(["events", "replay", "1", "77"], filled)
    assert result.returncode == 2, result.stderr
    assert "no event 77" in result.stderr and "events list" in result.stderr
    dead = json.loads(run_cli(["events", "list", "--json", "--status", "dead"], filled).stdout)
    assert [e["id"] for e in dead] == [1]  # event 1 was not queued again either
    assert run_cli(["events", "replay", "1"], filled).returncode == 0


HEAVY = {"data", "delivery", "attempts", "actions"}


def test_events_list_and_show_json_share_one_shape(filled):
    listed = {e["id"]: e for e in json.loads(run_cli(["events", "list", "--json"], filled).stdout)}
    assert set(listed) == {1, 2}
    for event_id, item in listed.items():
        shown = json.loads(run_cli(["events", "show", str(event_id), "--json"], filled).stdout)
        assert HEAVY <= set(shown)
        assert set(item) == set(shown) - HEAVY
        assert {key: shown[key] for key in item} == item
    assert listed[1]["attempt_count"] == 1 and isinstance(shown["attempts"], list)


def test_every_subdomain_option_takes_s_as_well():
    """`-s` is `--subdomain` on every command that takes one (reconcile and webhooks lacked it)."""
    missing = [
        name
        for name, command in all_commands()
        for param in command.params
        if "--subdomain" in param.opts and "-s" not in param.opts
    ]
    assert not missing, missing


def test_reconcile_and_webhooks_take_s(sqlite_url):
    from amohook.store import open_store

    open_store(sqlite_url).db.close()  # a store without that account: the refusal names the account
    for args in (["reconcile", "-s", "nosuch"], ["webhooks", "list", "-s", "nosuch"]):
        result = run_cli_here(args, sqlite_url)
        assert result.returncode == 2 and "no account 'nosuch'" in result.stderr, (args, result.stderr)


def test_worker_threads_is_the_deprecated_old_name_of_workers(sqlite_url):
    """One name for worker threads in `serve` and `worker`: --workers. Units and scripts in the
    field say `worker --threads N`: it keeps working, marked deprecated in --help, with one note."""
    base = ["worker", "--handler", "os.path:basename", "--once", "--reconcile", "off"]
    old = run_cli([*base, "--threads", "2"], sqlite_url)
    assert old.returncode == 0 and "processed 0 event(s)" in old.stdout, old.stderr
    assert old.stderr.strip() == "warning: `worker --threads` is deprecated — write `--workers 2` (same meaning)"
    new = run_cli([*base, "--workers", "2"], sqlite_url)
    assert new.returncode == 0 and new.stderr == "", new.stderr
    both = run_cli([*base, "--workers", "2", "--threads", "3"], sqlite_url)
    assert both.returncode == 2 and "disagree" in both.stderr, both.stderr
    shown = run_cli_here(["worker", "--help"], sqlite_url, env=cli_env(sqlite_url, **WIDE)).stdout
    assert re.search(r"--threads .*Deprecated", shown) and re.search(r"--workers .*Worker threads", shown), shown
