"""Every command of the CLI, by its full name."""

from __future__ import annotations


def all_commands():
    from amohook.cli import app

    group = app.command()
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            for sub, subcommand in command.commands.items():
                yield f"{name} {sub}", subcommand
        else:
            yield name, command
