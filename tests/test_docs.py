"""The README tells the truth: every command has help and is documented, every exit code too."""

from __future__ import annotations

from pathlib import Path

from amohook.errors import ExitCode

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
