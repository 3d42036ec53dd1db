"""`amohook rules check`: validate a rules file against the synced store."""

from __future__ import annotations

from typing import Annotated

import typer

from amohook.cli.common import CONTEXT_SETTINGS, print_json, say, state

rules_app = typer.Typer(
    no_args_is_help=True,
    context_settings=CONTEXT_SETTINGS,
    help="Rules that act when leads change or tasks are completed.",
)

RulesOpt = Annotated[
    str | None,
    typer.Option("--rules", envvar="AMOHOOK_RULES", show_envvar=True, help="The rules file (TOML)."),
]


@rules_app.command("check")
def check(
    ctx: typer.Context,
    rules: RulesOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the compiled rules as JSON.")] = False,
):
    """Check a rules file: names resolve in the synced store, templates and due dates are valid."""
    from amohook.errors import ConfigError
    from amohook.rules import describe_actions, load_and_compile, rule_summaries

    if not rules:
        raise ConfigError("no rules file — give --rules FILE or set AMOHOOK_RULES")
    state(ctx).store()
    compiled = load_and_compile(rules)
    if as_json:
        print_json(rule_summaries(compiled))
        return
    for r in compiled:
        where = f"pipeline {r.pipeline_name!r}" if r.pipeline_name else "any pipeline"
        say(f"ok  {r.name}: {r.spec.when} in {where} → {describe_actions(r)}")
    say(f"{len(compiled)} rule{'s' if len(compiled) != 1 else ''} valid")


def register(app: typer.Typer) -> None:
    app.add_typer(rules_app, name="rules")
