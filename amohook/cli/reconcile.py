"""`amohook reconcile` (one pass over the events log) and `amohook webhooks` (subscriptions)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from amohook.cli.common import CONTEXT_SETTINGS, duration, print_json, say, state, warn
from amohook.durations import format_duration
from amohook.times import human_time, iso_time

SubdomainOpt = Annotated[
    str | None, typer.Option("--subdomain", "-s", help="The account (default: the only one stored).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

# amoCRM's webhook event codes (amoCRM docs: crm_platform/webhooks-api).
WEBHOOK_EVENTS = (
    "responsible_lead",
    "responsible_contact",
    "responsible_company",
    "responsible_customer",
    "responsible_task",
    "restore_lead",
    "restore_contact",
    "restore_company",
    "add_lead",
    "add_contact",
    "add_company",
    "add_customer",
    "add_talk",
    "add_task",
    "update_lead",
    "update_contact",
    "update_company",
    "update_customer",
    "update_talk",
    "update_task",
    "delete_lead",
    "delete_contact",
    "delete_company",
    "delete_customer",
    "delete_task",
    "status_lead",
    "note_lead",
    "note_contact",
    "note_company",
    "note_customer",
    "add_chat_template_review",
)
# What each rule trigger needs amoCRM to send.
TRIGGER_EVENTS = {
    "lead.stage_changed": ("status_lead",),
    "lead.added": ("add_lead",),
    "lead.responsible_changed": ("responsible_lead",),
    "task.completed": ("update_task",),
}
DEFAULT_EVENTS = ("status_lead", "add_lead", "responsible_lead")

webhooks_app = typer.Typer(
    help="List, subscribe and unsubscribe amoCRM webhook destinations (admin token only).",
    no_args_is_help=True,
    context_settings=CONTEXT_SETTINGS,
)


def _account(subdomain: str | None) -> str:
    from amohook.tokens import get_account

    return get_account(subdomain).subdomain


def reconcile(
    ctx: typer.Context,
    subdomain: SubdomainOpt = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Catch up: also read this far back (30m, 1h, 1d; 1s to 366d), even before the account was "
            "connected to this store. Without it a pass reads from where the last one stopped, the first from "
            "the connection.",
        ),
    ] = None,
    max_lookback: Annotated[
        str,
        typer.Option("--max-lookback", help="Never read further back than this, however old the cursor (1s to 366d)."),
    ] = "7d",
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Show what the pass would do — changes found, which are known, what the rules would plan — "
            "and write nothing.",
        ),
    ] = False,
    rules: Annotated[
        str | None,
        typer.Option(
            "--rules",
            envvar="AMOHOOK_RULES",
            show_envvar=True,
            help="With --dry-run: the rules file whose plans to show.",
        ),
    ] = None,
    as_json: JsonOpt = False,
):
    """Queue the lead changes in amoCRM's events log that no webhook brought (one pass per account)."""
    from amohook.amocrm.client import client_for
    from amohook.recovery.reconcile import reconcilable_accounts, reconcile_account

    since_s = duration(ctx, "since", off=False) if since is not None else None
    lookback_s = duration(ctx, "max_lookback", off=False)
    store = state(ctx).store()
    accounts = [_account(subdomain)] if subdomain else reconcilable_accounts()
    if not accounts:
        from amohook.errors import AccountNotFound

        raise AccountNotFound(None)
    if dry_run:
        _dry_run(store, accounts, rules, since_s, lookback_s, as_json)
        return
    results = []
    for account in accounts:
        results.append(
            reconcile_account(
                store, client_for(store, account), account, since=since_s, max_lookback=lookback_s, watchdog=True
            )
        )
    if as_json:
        print_json([r.as_dict() for r in results])
        return
    for r in results:
        if r.busy:
            say(f"{r.account}: {r.notes[0] if r.notes else 'another amohook process is running a pass; skipped'}")
            continue
        say(
            f"{r.account}: read {r.read} event(s) from {human_time(r.window_from)} to {human_time(r.window_to)}: "
            f"{r.known} already known, {r.queued} recovered and queued ({r.requests} request(s))"
        )
        if r.skipped:
            skipped = [n for n in r.notes if n.startswith("skipped events-log entry")]
            warn(
                f"warning: {r.account}: {r.skipped} events-log entr{'y' if r.skipped == 1 else 'ies'} could not be "
                f"stored and were skipped ({skipped[0] if skipped else 'see --json'}"
                + (f"; and {len(skipped) - 1} more" if len(skipped) > 1 else "")
                + ")"
            )
        if r.left_out_from is not None:
            warn(
                f"warning: {r.account}: changes from {human_time(r.left_out_from)} to {human_time(r.left_out_to)} were "
                "left out (older than --max-lookback); raise it to read them"
            )
        if r.subscription:
            say(
                f"{r.account}: webhook subscriptions: {r.subscription}"
                + (f" — {r.subscription_note}" if r.subscription_note else "")
            )


def _dry_run(store, accounts: list[str], rules: str | None, since: float | None, lookback: float, as_json: bool):
    """`reconcile --dry-run`: one preview per account, nothing written."""
    from amohook.amocrm.client import client_for
    from amohook.recovery.reconcile import preview_account

    compiled = None
    if rules:
        from amohook.rules import load_and_compile

        compiled = load_and_compile(rules)
    previews = [
        preview_account(store, client_for(store, a), a, rules=compiled, since=since, max_lookback=lookback)
        for a in accounts
    ]
    if as_json:
        for p in previews:
            for key in ("window_from", "window_to", "first_look"):
                p[key] = iso_time(p[key])
            for change in p["changes"]:
                change["at"] = iso_time(change["at"])
        print_json(previews)
        return
    for p in previews:
        say(
            f"{p['account']} (dry run, nothing written): would read {human_time(p['window_from'])} to "
            f"{human_time(p['window_to'])}: {p['read']} event(s), {p['known']} already known, "
            f"{p['new']} new, {p['skipped']} skipped"
        )
        for known in p["known_changes"]:
            say(f"  known: lead {known['lead_id']} {known['type']} (event {known['event_id']})")
        for change in p["changes"]:
            say(f"  new:   lead {change['lead_id']} {change['type']} at {human_time(change['at'])}")
            if compiled is not None and not change["actions"]:
                say("         no rule fires")
            for action in change["actions"]:
                state_note = (
                    " (already recorded: not again)"
                    if action["already_recorded"]
                    else (f" (would be skipped: {action['skip_reason']})" if action["skip_reason"] else "")
                )
                what = action["payload"].get("text") or (action["payload"].get("params") or {}).get("text")
                say(
                    f"         rule '{action['rule']}' would plan {action['kind']}"
                    + (f": {what!r}" if what else "")
                    + state_note
                )
        if compiled is None and p["changes"]:
            say("  (give --rules or AMOHOOK_RULES to see what the rules would plan)")
        for note in p["notes"]:
            say(f"  note: {note}")


def _rules_events(rules: str) -> list[str]:
    from amohook.rules import load_rules_file

    wanted: list[str] = []
    for spec in load_rules_file(rules):
        for code in TRIGGER_EVENTS.get(spec.when, ()):
            if code not in wanted:
                wanted.append(code)
    return wanted


def _parse_events(text: str) -> list[str]:
    from amohook.errors import ConfigError

    codes = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in codes if c not in WEBHOOK_EVENTS]
    if unknown or not codes:
        import difflib

        hints = [
            f"'{u}'" + (f" (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, WEBHOOK_EVENTS, 1)) else "")
            for u in unknown
        ]
        raise ConfigError(
            f"unknown webhook event {', '.join(hints) or '(none given)'} — use amoCRM's codes, e.g. "
            "status_lead,add_lead,update_lead,responsible_lead"
        )
    return codes


URL_HELP = (
    "The destination amoCRM will POST to, exactly as it should be called. Write {secret} where the "
    "webhook secret goes: it is read from AMOHOOK_WEBHOOK_SECRET, else from the store (the one `serve` "
    "keeps there), so the secret never stands on the command line (where `ps` shows it)."
)
PublicUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--public-url",
        envvar="AMOHOOK_PUBLIC_URL",
        show_envvar=True,
        help="The https address amoCRM reaches `serve` at, through your TLS proxy (https://hooks.example.com).",
    ),
]


def _hold_env_secret() -> None:
    """Hold AMOHOOK_WEBHOOK_SECRET so that no destination printed shows it, wherever it stands."""
    import os

    from amohook.redact import hold_secret
    from amohook.settings import ENV_WEBHOOK_SECRET

    hold_secret(os.environ.get(ENV_WEBHOOK_SECRET) or None)


def _webhook_secret(ctx: typer.Context) -> str:
    """The secret `serve` uses: AMOHOOK_WEBHOOK_SECRET when set, else the one it keeps in the store."""
    import os

    from amohook.errors import ConfigError
    from amohook.redact import hold_secret
    from amohook.settings import ENV_WEBHOOK_SECRET
    from amohook.webhooks.secret import stored_secret
    from amohook.webhooks.server import check_secret

    explicit = os.environ.get(ENV_WEBHOOK_SECRET)
    if explicit:
        hold_secret(explicit)
        return check_secret(explicit)
    store = state(ctx).store()
    kept = stored_secret(store)
    hold_secret(kept)
    if kept is None:
        from amohook.dburl import redact

        where = str(store.sqlite_path) if store.sqlite_path is not None else redact(store.url)
        raise ConfigError(
            f"no webhook secret: {ENV_WEBHOOK_SECRET} is not set and the store at {where} holds none — "
            f"start `amohook serve` once without {ENV_WEBHOOK_SECRET} (it makes one and keeps it in the store), "
            "or set it"
        )
    return check_secret(kept)


def _check_url(ctx: typer.Context, url: str) -> str:
    """The destination with ``{secret}`` filled in (environment, else the store), checked."""
    from urllib.parse import urlsplit

    from amohook.errors import ConfigError

    _hold_env_secret()
    if "{secret}" in url:
        url = url.replace("{secret}", _webhook_secret(ctx))
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c in url for c in " \t\r\n"):
        raise ConfigError("--url must be a full http(s) URL such as https://hooks.example.com/webhook/SECRET")
    if len(url) > 2000:
        raise ConfigError("--url is longer than 2,000 characters")
    return url


def webhooks_list(ctx: typer.Context, subdomain: SubdomainOpt = None, as_json: JsonOpt = False):
    """The account's webhook destinations, their events and whether amoCRM switched them off."""
    from amohook.amocrm.client import client_for
    from amohook.amocrm.subscriptions import list_webhooks
    from amohook.recovery.watchdog import destination_sha, redact_destination, watched

    _hold_env_secret()
    store = state(ctx).store()
    account = _account(subdomain)
    hooks = list_webhooks(client_for(store, account))
    ours = {s.destination_sha256 for s in watched(account)}
    rows: list[dict[str, Any]] = [
        {
            "destination": redact_destination(h.destination),
            "events": list(h.events),
            "disabled": h.disabled,
            "by_amohook": destination_sha(h.destination) in ours,
        }
        for h in hooks
    ]
    if as_json:
        print_json(rows)
        return
    if not rows:
        say(f"{account}: no webhook subscriptions")
        return
    for row in rows:
        flag = "OFF" if row["disabled"] else "on"
        mine = " (amohook)" if row["by_amohook"] else ""
        say(f"{flag:3}  {row['destination']}{mine}  {','.join(row['events'])}")


def webhooks_url(ctx: typer.Context, public_url: PublicUrlOpt = None):
    """Print the exact URL to give amoCRM for `serve`'s webhooks (the one place the secret is shown)."""
    from amohook.webhooks.secret import check_public_url, webhook_url

    base = check_public_url(public_url)
    if not base.startswith("https://"):
        warn("warning: the URL is not https — amoCRM sends lead data in the clear; put a TLS proxy in front")
    say(webhook_url(base, _webhook_secret(ctx)))


def webhooks_subscribe(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option("--url", help=URL_HELP + " Default: the --public-url address's /webhook/{secret}."),
    ] = None,
    events: Annotated[
        str | None,
        typer.Option(
            "--events",
            help="Comma-separated amoCRM event codes (default: what --rules needs, "
            "else status_lead,add_lead,responsible_lead).",
        ),
    ] = None,
    rules: Annotated[
        str | None,
        typer.Option(
            "--rules", envvar="AMOHOOK_RULES", show_envvar=True, help="Rules file whose triggers pick the events."
        ),
    ] = None,
    public_url: PublicUrlOpt = None,
    subdomain: SubdomainOpt = None,
):
    """Subscribe URL to amoCRM's webhooks (an existing destination is updated); the watchdog then looks after it."""
    from amohook.amocrm.client import client_for
    from amohook.amocrm.subscriptions import subscribe
    from amohook.recovery.watchdog import redact_destination, remember

    if url is None:
        from amohook.webhooks.secret import check_public_url

        url = check_public_url(public_url) + "/webhook/{secret}"
    url = _check_url(ctx, url)
    codes = _parse_events(events) if events else (_rules_events(rules) if rules else list(DEFAULT_EVENTS))
    if not codes:
        codes = list(DEFAULT_EVENTS)
    if not url.startswith("https://"):
        warn("warning: the URL is not https — amoCRM sends lead data in the clear; put a TLS proxy in front")
    store = state(ctx).store()
    account = _account(subdomain)
    hook = subscribe(client_for(store, account), url, codes)
    remember(store, account, url, codes)
    say(
        f"{account}: subscribed {redact_destination(url)} to {', '.join(codes)}"
        + (" (amoCRM reports it switched off)" if hook.disabled else "")
    )


def webhooks_unsubscribe(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option("--url", help="The destination, exactly as subscribed. " + URL_HELP.split(". ", 1)[1])
    ],
    subdomain: SubdomainOpt = None,
):
    """Remove a destination from amoCRM's webhooks (all its events)."""
    from amohook.amocrm.client import client_for
    from amohook.amocrm.subscriptions import unsubscribe
    from amohook.errors import ConfigError
    from amohook.recovery.watchdog import forget, redact_destination

    url = _check_url(ctx, url)
    store = state(ctx).store()
    account = _account(subdomain)
    removed = unsubscribe(client_for(store, account), url)
    forget(store, account, url)
    if not removed:
        raise ConfigError(
            f"{account}: amoCRM has no subscription {redact_destination(url)} — "
            "`amohook webhooks list` shows what there is (the URL must match exactly)"
        )
    say(f"{account}: unsubscribed {redact_destination(url)}")


def reconcile_rows(now: float) -> list[dict]:
    """Per account, what `status` shows about reconciliation and the subscriptions."""
    from amohook.recovery.reconcile import reconcile_status
    from amohook.store.models import Account

    rows = []
    for account in Account.select(Account.subdomain).order_by(Account.subdomain):
        st = reconcile_status(account.subdomain, now)
        rows.append(
            {
                "subdomain": st.account,
                "last_pass_at": iso_time(st.last_pass_at),
                "cursor_lag_seconds": None if st.lag is None else round(st.lag),
                "recovered_24h": st.recovered_24h,
                "subscription": st.subscription,
                "subscription_note": st.subscription_note,
                "last_error": st.last_error,
            }
        )
    return rows


def describe_row(row: dict) -> str:
    lag = "never run" if row["cursor_lag_seconds"] is None else f"lag {format_duration(row['cursor_lag_seconds'])}"
    text = (
        f"{row['subdomain']}: reconciliation {lag}, {row['recovered_24h']} change(s) recovered in 24 h, "
        f"subscriptions {row['subscription']}"
    )
    if row["last_error"]:
        text += f"; last pass failed: {row['last_error']}"
    return text


def register(app: typer.Typer) -> None:
    app.command("reconcile")(reconcile)
    webhooks_app.command("url")(webhooks_url)
    webhooks_app.command("list")(webhooks_list)
    webhooks_app.command("subscribe")(webhooks_subscribe)
    webhooks_app.command("unsubscribe")(webhooks_unsubscribe)
    app.add_typer(webhooks_app, name="webhooks")
