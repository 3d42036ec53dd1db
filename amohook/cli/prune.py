"""`amohook prune`: delete old finished work by hand (serve and worker also do it every hour)."""

from __future__ import annotations

from typing import Annotated

import typer

from amohook.cli.common import duration, print_json, say, state


def prune(
    ctx: typer.Context,
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            envvar="AMOHOOK_KEEP",
            show_envvar=True,
            help="Delete done events, their deliveries and attempts, and finished actions older than "
            "this (1d to 366d; dead events and failed actions: 90 days). `off` deletes nothing.",
        ),
    ] = "30d",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would go; delete nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
):
    """Delete old done events, deliveries, attempts and finished actions; keys stay while duplicates can arrive.

    One prune at a time across the database (serve's and worker's hourly pruning too): while
    another holds the lease this exits 4 naming the holder and when its lease runs out."""
    from amohook.ops.retention import MIN_KEEP, MIN_KEEP_WHY, PruneResult, prune_by_hand

    keep = duration(ctx, "older_than", low=MIN_KEEP, why_low=MIN_KEEP_WHY)
    if keep is None:  # off: keep everything, as `serve --keep off` does
        if as_json:
            print_json({**PruneResult(dry_run=dry_run).as_dict(), "keep_seconds": None})
        else:
            say("retention is off (--older-than/AMOHOOK_KEEP is 'off'): nothing deleted")
        return
    result = prune_by_hand(state(ctx).store(), keep=keep, dry_run=dry_run)
    if as_json:
        print_json({**result.as_dict(), "keep_seconds": keep})
        return
    verb = "would delete" if dry_run else "deleted"
    say(
        f"{verb}: {result.events} done event(s), {result.dead_events} dead event(s), {result.deliveries} "
        f"deliveries, {result.attempts} attempt(s), {result.actions} action(s), {result.changes} change record(s)"
    )


def register(app: typer.Typer) -> None:
    app.command("prune")(prune)
