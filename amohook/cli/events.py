"""`amohook events`: look at the queue and queue events again."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any

import typer

from amohook.cli.common import CONTEXT_SETTINGS, print_json, say, state, warn
from amohook.times import human_time, iso_time

events_app = typer.Typer(
    no_args_is_help=True,
    context_settings=CONTEXT_SETTINGS,
    help="Look at received webhook events and queue them again.",
)

STATUSES = ("pending", "running", "done", "dead")
Status = Enum("Status", {name: name for name in STATUSES}, type=str)  # type: ignore[misc]  # from STATUSES
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _row(event) -> dict:
    """An event in JSON, as `events list` prints it; `events show` adds the heavy parts to the same
    keys ("data", "delivery", "attempts", "actions"), so a script reads both alike."""
    return {
        "id": event.id,
        "delivery_id": event.delivery_id,
        "entity": event.entity,
        "action": event.action,
        "entity_id": event.entity_id,
        "account": event.account,
        "account_id": event.account_id,
        "source": event.source or "webhook",  # or "events_log": recovered by reconciliation
        "status": event.status,
        "attempt_count": event.attempts,
        "received_at": iso_time(event.received_at),
        "next_attempt_at": iso_time(event.next_attempt_at) if event.status == "pending" else None,
        "updated_at": iso_time(event.updated_at),
        "lease_owner": event.lease_owner if event.status == "running" else None,
        "lease_until": iso_time(event.lease_until) if event.status == "running" else None,
        "last_error": event.last_error,
    }


@events_app.command("list")
def list_(
    ctx: typer.Context,
    status: Annotated[
        Status | None, typer.Option("--status", case_sensitive=False, help="Only events in this state.")
    ] = None,
    entity: Annotated[
        str | None, typer.Option("--entity", help="leads, contacts, companies, tasks, unsorted, …")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100_000, help="At most this many, newest first.")] = 50,
    as_json: JsonOpt = False,
):
    """List events, newest first."""
    from amohook.inbox import list_events

    status = status.value if status is not None else None
    rows = list_events(state(ctx).store(), status=status, entity=entity, limit=limit)
    if as_json:
        print_json([_row(e) for e in rows])
        return
    if not rows:
        say("no events" + (f" with status {status}" if status else "") + (f" for {entity}" if entity else ""))
        return
    from amohook.cli.common import console, plain, table

    columns = (
        ("id", "id"),
        ("received", "time"),
        ("event", "text"),
        ("entity id", "id"),
        ("account", "text"),
        ("status", "text"),
        ("tries", "number"),
        ("last error", "text"),
    )
    # Everything but the numbers came from outside (the webhook, amoCRM's answers): plain text.
    cells = [
        (
            str(e.id),
            human_time(e.received_at),
            plain(f"{e.entity} {e.action}"),
            plain(e.entity_id),
            plain(e.account),
            plain(e.status),
            str(e.attempts),
            plain((e.last_error or "")[:80]),
        )
        for e in rows
    ]
    console().print(table("events (newest first)", columns, cells))


@events_app.command("show")
def show(
    ctx: typer.Context,
    event_id: Annotated[
        int, typer.Argument(metavar="ID", min=1, max=2**63 - 1, help="Event id (see `amohook events list`).")
    ],
    as_json: JsonOpt = False,
):
    """Show one event: its parsed data, the raw body it came in, and every attempt."""
    from amohook.errors import ConfigError
    from amohook.inbox import event_detail

    detail = event_detail(state(ctx).store(), event_id)
    if detail is None:
        raise ConfigError(f"no event {event_id} — `amohook events list` shows the ids")
    event, delivery = detail.event, detail.delivery
    try:
        data = json.loads(event.data or "{}")
    except ValueError:
        data = event.data
    attempts = [
        {
            "worker": a.worker,
            "started_at": iso_time(a.started_at),
            "finished_at": iso_time(a.finished_at),
            "outcome": a.outcome,
            "error": a.error,
        }
        for a in detail.attempts
    ]
    delivery_json = None
    if delivery is not None:
        try:
            headers = json.loads(delivery.headers or "{}")
        except ValueError:
            headers = {}
        delivery_json = {
            "id": delivery.id,
            "received_at": iso_time(delivery.received_at),
            "times_received": delivery.times_received,
            "content_type": delivery.content_type,
            "remote_addr": delivery.remote_addr,
            "headers": headers,
            "body_sha256": delivery.body_sha256,
            "body": delivery.body,
        }
    actions: list[dict[str, Any]] = [
        {
            "rule": a.rule,
            "kind": a.kind,
            "status": a.status,
            "task_id": a.result_id,
            "attempts": a.attempts,
            "last_error": a.last_error,
        }
        for a in detail.actions
    ]
    if as_json:
        print_json({**_row(event), "data": data, "delivery": delivery_json, "attempts": attempts, "actions": actions})
        return
    say(f"event {event.id}: {event.entity} {event.action} {event.entity_id or ''} (account {event.account or '?'})")
    say(f"  status: {event.status}, attempts: {event.attempts}")
    say(f"  received: {human_time(event.received_at)}, updated: {human_time(event.updated_at)}")
    if event.status == "pending":
        say(f"  next attempt: {human_time(event.next_attempt_at)}")
    if event.status == "running":
        say(f"  held by {event.lease_owner} until {human_time(event.lease_until)}")
    if event.last_error:
        say(f"  last error: {event.last_error}")
    say("data:")
    say(json.dumps(data, ensure_ascii=False, indent=2))
    if delivery is not None and delivery_json is not None:
        say(
            f"delivery {delivery.id}: received {delivery_json['times_received']} time(s), first at "
            f"{human_time(delivery.received_at)} from {_origin(event, delivery)}, "
            f"{delivery.content_type or 'no content type'}"
        )
        for name, value in sorted(delivery_json["headers"].items()):
            say(f"  {name}: {value}")
        say("body:")
        say(delivery.body)
    say(f"attempts ({len(attempts)}):")
    for a in detail.attempts:
        say(f"  {human_time(a.started_at)}  {a.outcome:<8} {a.worker}" + (f"  {a.error}" if a.error else ""))
    if actions:
        from amohook.actions.registry import noun

        say(f"rule actions ({len(actions)}):")
        for act in actions:
            task = f" → {noun(act['kind'])} {act['task_id']}" if act["task_id"] else ""
            say(
                f"  {act['rule']}: {act['kind']} {act['status']}{task}"
                + (f"  {act['last_error']}" if act["last_error"] else "")
            )


@events_app.command("replay")
def replay(
    ctx: typer.Context,
    event_ids: Annotated[
        list[int] | None, typer.Argument(metavar="[ID]...", min=1, max=2**63 - 1, help="Events to queue again.")
    ] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Queue every dead event again.")] = False,
    as_json: JsonOpt = False,
):
    """Queue events again (attempts start from zero); handlers must be idempotent, as always."""
    import time

    from amohook.errors import ConfigError, ExitCode
    from amohook.inbox import replay as replay_events

    if not event_ids and not dead:
        raise ConfigError("give event ids, or --dead to queue every dead event again")
    if event_ids and dead:
        raise ConfigError("give event ids or --dead, not both")
    result = replay_events(state(ctx).store(), event_ids or [], dead=dead, now=time.time())
    if result.missing:
        raise ConfigError(f"no event {_ids(result.missing)} — `amohook events list` shows the ids; nothing was queued")
    if as_json:
        print_json({"queued": result.queued, "skipped": {str(k): v for k, v in result.skipped.items()}})
    else:
        if result.queued:
            say(f"queued again: {len(result.queued)} event(s) ({_ids(result.queued)})")
        elif dead:
            say("no dead events")
        for event_id, why in result.skipped.items():
            warn(f"event {event_id}: {why}")
    if result.skipped:
        raise typer.Exit(int(ExitCode.ERROR))


def _origin(event, delivery) -> str:
    """Where a delivery came from: the sender's address, or amoCRM's events log for what
    reconciliation recovered (no address: amohook read it)."""
    if (event.source or "webhook") == "events_log":
        return "amoCRM's events log (reconciliation)"
    return delivery.remote_addr or "an unknown address"


def _ids(ids: list[int], limit: int = 20) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", … {len(ids) - limit} more" if len(ids) > limit else "")


def register(app: typer.Typer) -> None:
    app.add_typer(events_app, name="events")
