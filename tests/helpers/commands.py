"""Every command of the CLI, by its full name."""

from __future__ import annotations


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
