"""`amohook rules`: check a rules file, rehearse it over amoCRM's history, explain a lead."""

from __future__ import annotations

from typing import Annotated

import typer

from amohook.cli.common import CONTEXT_SETTINGS, duration, print_json, say, state
from amohook.times import human_time, iso_time

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


SinceOpt = Annotated[str, typer.Option("--since", help="How far back to look (30m, 2h, 7d).")]
SubdomainOpt = Annotated[
    str | None, typer.Option("--subdomain", "-s", help="The account (default: the only one stored).")
]
EXAMPLES = 3  # actions shown per rule in the text output; --json lists them all


def _compiled(ctx: typer.Context, rules: str | None):
    from amohook.errors import ConfigError
    from amohook.rules import load_and_compile

    if not rules:
        raise ConfigError("no rules file — give --rules FILE or set AMOHOOK_RULES")
    store = state(ctx).store()
    return store, load_and_compile(rules)


def _window(ctx: typer.Context) -> tuple[int, int]:
    """``--since`` as a closed window ending now (Unix seconds)."""
    import time

    seconds = duration(ctx, "since", off=False)
    now = int(time.time())
    return now - int(seconds), now


@rules_app.command("test")
def test(
    ctx: typer.Context,
    rules: RulesOpt = None,
    since: SinceOpt = "7d",
    subdomain: SubdomainOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
):
    """Show what the rules would have done over amoCRM's events log, doing nothing (reads only)."""
    from amohook.amocrm.client import client_for
    from amohook.recovery.rehearse import CANNOT_KNOW, rehearse
    from amohook.tokens import get_account

    store, compiled = _compiled(ctx, rules)
    account = get_account(subdomain)
    window_from, window_to = _window(ctx)
    result = rehearse(
        client_for(store, account.subdomain),
        compiled,
        account.subdomain,
        window_from=window_from,
        window_to=window_to,
        timezone=account.timezone,
    )
    if as_json:
        print_json(
            {
                "window": {"from": iso_time(result.window_from), "to": iso_time(result.window_to)},
                "changes": result.changes,
                "rules": [
                    {"name": r.name, "matched": r.matched, "actions": [a.as_dict() for a in r.actions]}
                    for r in result.rules
                ],
            }
        )
        return
    say(
        f"{account.subdomain}: {result.changes} lead change(s) in amoCRM's events log from "
        f"{human_time(result.window_from)} to {human_time(result.window_to)} ({result.requests} read request(s); "
        "nothing was sent, queued or recorded)"
    )
    total = 0
    for r in result.rules:
        total += len(r.actions)
        if not r.rehearsed:
            say(f"-   {r.name}: {r.when} — not rehearsed (the events log cannot replay it)")
            continue
        mark = "*" if r.actions else "-"
        say(f"{mark}   {r.name}: matched {r.matched} change(s), would plan {len(r.actions)} action(s)")
        for a in r.actions[:EXAMPLES]:
            flag = " — skipped by the loop guard" if a.skipped else ""
            say(f"      {human_time(a.at)}  lead {a.lead}: {a.summary}{flag}")
        if len(r.actions) > EXAMPLES:
            say(f"      … and {len(r.actions) - EXAMPLES} more (--json lists them all)")
        for note in sorted(set(r.notes))[:EXAMPLES]:
            say(f"      note: {note}")
    say(f"total: {total} action(s) from {len(result.rules)} rule(s)")
    say(f"what this cannot know: {CANNOT_KNOW}; chains of rules (a rule's own move) are not followed")


@rules_app.command("explain")
def explain(
    ctx: typer.Context,
    lead: Annotated[int, typer.Option("--lead", help="The lead's amoCRM id.", min=1)],
    rules: RulesOpt = None,
    since: SinceOpt = "7d",
    subdomain: SubdomainOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
):
    """Why did a lead get (or not get) a task: each of its changes, each rule, what it did or why not."""
    from amohook.amocrm.client import client_for
    from amohook.recovery.explain import explain_lead
    from amohook.tokens import get_account

    store, compiled = _compiled(ctx, rules)
    account = get_account(subdomain)
    window_from, window_to = _window(ctx)
    changes = explain_lead(
        client_for(store, account.subdomain),
        compiled,
        account.subdomain,
        lead,
        window_from=window_from,
        window_to=window_to,
    )
    if as_json:
        print_json(
            {
                "lead": lead,
                "window": {"from": iso_time(window_from), "to": iso_time(window_to)},
                "changes": [c.as_dict(iso_time) for c in changes],
            }
        )
        return
    say(
        f"lead {lead} in {account.subdomain}: {len(changes)} change(s) "
        f"from {human_time(window_from)} to {human_time(window_to)}"
    )
    for c in changes:
        seen = ", ".join(c.seen) if c.seen else "not seen by amohook (only in amoCRM's events log)"
        say(f"{human_time(c.at)}  {c.kind}: {c.what} — {seen}")
        for v in c.rules:
            done = "; ".join(
                f"{a['kind']} {a['status']}" + (f" (amoCRM id {a['amocrm_id']})" if a["amocrm_id"] else "")
                for a in v.actions
            )
            if v.fired:
                say(f"  fired  {v.rule}: {done}" + (f" — {v.reason}" if v.reason else ""))
            else:
                say(f"  no     {v.rule}: {v.reason}")


def register(app: typer.Typer) -> None:
    app.add_typer(rules_app, name="rules")
