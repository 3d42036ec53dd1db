"""Commands of the token lifecycle: init-auth, auth-url, refresh-token, status."""

from __future__ import annotations

import time
from enum import Enum
from typing import Annotated

import typer

from amohook.cli.common import print_json, say, state, warn
from amohook.durations import format_duration
from amohook.settings import DOMAINS, ENV_CLIENT_SECRET
from amohook.times import human_time, iso_time

# The domains amoCRM and Kommo serve accounts under, as a choice `--help` lists and Click checks.
Domain = Enum("Domain", {name: name for name in DOMAINS}, type=str)  # type: ignore[misc]  # built from DOMAINS
DomainOpt = Annotated[Domain, typer.Option("--domain", case_sensitive=False, help="The account's domain.")]

SubdomainOpt = Annotated[
    str | None, typer.Option("--subdomain", "-s", help="Account subdomain (the part before .amocrm.ru).")
]


def _client_secret(flag: str | None, prompt: bool = True) -> str:
    from amohook.errors import ConfigError
    from amohook.settings import ENV_CLIENT_SECRET, secret_from

    secret = secret_from(flag, ENV_CLIENT_SECRET)
    if not secret and prompt:
        import sys

        if not sys.stdin.isatty():
            raise ConfigError(
                "the client secret is missing — set AMOHOOK_CLIENT_SECRET (or run in a terminal to be asked for it)"
            )
        secret = typer.prompt("Client secret (Secret key from the integration's Keys tab)", hide_input=True)
    if not secret:
        raise ConfigError("the client secret is missing — set AMOHOOK_CLIENT_SECRET")
    return secret.strip()


def _interactive() -> bool:
    import sys

    return sys.stdin.isatty()


def init_auth(
    ctx: typer.Context,
    subdomain: Annotated[
        str, typer.Option("--subdomain", "-s", help="Account subdomain, e.g. mycompany for mycompany.amocrm.ru.")
    ],
    code: Annotated[
        str | None,
        typer.Option(
            "--code",
            envvar="AMOHOOK_AUTH_CODE",
            show_envvar=True,
            help="Authorization code from the integration's Keys tab (lives 20 minutes). Prefer the environment "
            "variable or the hidden prompt: command lines are visible in `ps`.",
        ),
    ] = None,
    long_lived_token: Annotated[
        str | None,
        typer.Option(
            "--long-lived-token",
            envvar="AMOHOOK_LONG_LIVED_TOKEN",
            show_envvar=True,
            help="Store a long-lived token instead of exchanging a code. Prefer the environment variable: "
            "command lines are visible in `ps`.",
        ),
    ] = None,
    client_id: Annotated[
        str | None, typer.Option("--client-id", envvar="AMOHOOK_CLIENT_ID", help="Integration ID.")
    ] = None,
    client_secret: Annotated[
        str | None,
        typer.Option(
            "--client-secret",
            envvar=ENV_CLIENT_SECRET,
            show_envvar=True,
            help="Secret key. Prefer the environment variable or the hidden prompt: command lines are visible in `ps`.",
        ),
    ] = None,
    redirect_uri: Annotated[
        str | None,
        typer.Option(
            "--redirect-uri",
            envvar="AMOHOOK_REDIRECT_URI",
            help="Redirect URI exactly as in the integration's settings.",
        ),
    ] = None,
    domain: DomainOpt = Domain["amocrm.ru"],
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="API base URL, overriding subdomain+domain (proxies).")
    ] = None,
):
    """Exchange an authorization code for tokens (or store a long-lived token) and check they work."""
    from amohook.amocrm.oauth import Client
    from amohook.auth import authorize_with_code, authorize_with_long_lived_token
    from amohook.errors import ConfigError
    from amohook.settings import base_url_for, check_subdomain

    sub = check_subdomain(subdomain)
    url = base_url_for(sub, domain.value, base_url)
    st = state(ctx)
    if long_lived_token:
        account = authorize_with_long_lived_token(
            st.store(create=True), subdomain=sub, base_url=url, token=long_lived_token
        )
        expires = f", expires {human_time(account.expires_at)}" if account.expires_at else ""
        say(
            f"stored the long-lived token for {sub} (amoCRM account {account.amo_account_id}{expires}); "
            "it is never refreshed"
        )
        return
    missing = [name for name, value in (("--client-id", client_id), ("--redirect-uri", redirect_uri)) if not value]
    if not code and (missing or not _interactive()):
        missing.insert(0, "--code (or AMOHOOK_AUTH_CODE)")
    if missing or not client_id or not redirect_uri:  # (both are in `missing` when empty)
        raise ConfigError(
            f"init-auth needs {', '.join(missing)} (or --long-lived-token) — all are in the integration's Keys tab"
        )
    secret = _client_secret(client_secret)
    if not code:
        code = str(typer.prompt("Authorization code (Keys tab; it lives 20 minutes)", hide_input=True))
    if not code.strip():
        raise ConfigError("the authorization code is empty — copy it from the integration's Keys tab")
    client = Client(client_id.strip(), secret, redirect_uri.strip())
    account = authorize_with_code(st.store(create=True), subdomain=sub, base_url=url, client=client, code=code)
    say(
        f"authorized {sub} (amoCRM account {account.amo_account_id}); access token valid until "
        f"{human_time(account.expires_at)}. Renew the tokens with `amohook refresh-token` every 30 minutes "
        '(a systemd timer or cron: README, "From the quick start to a service")'
    )


def auth_url(
    ctx: typer.Context,
    client_id: Annotated[str, typer.Option("--client-id", envvar="AMOHOOK_CLIENT_ID", help="Integration ID.")],
    redirect_uri: Annotated[
        str,
        typer.Option(
            "--redirect-uri",
            envvar="AMOHOOK_REDIRECT_URI",
            help="Redirect URI; point it at `amohook serve`'s /oauth/callback.",
        ),
    ],
    client_secret: Annotated[
        str | None,
        typer.Option(
            "--client-secret",
            envvar=ENV_CLIENT_SECRET,
            show_envvar=True,
            help="Secret key. Prefer the environment variable: command lines are visible in `ps`.",
        ),
    ] = None,
    domain: DomainOpt = Domain["amocrm.ru"],
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="API base URL to use after the redirect (proxies).")
    ] = None,
):
    """Print the URL that grants access; `amohook serve` completes it at /oauth/callback."""
    from amohook.amocrm.oauth import Client
    from amohook.auth import start_authorization

    if base_url:
        from amohook.settings import base_url_for

        base_url = base_url_for("x", base_url=base_url)
    client = Client(client_id.strip(), _client_secret(client_secret), redirect_uri.strip())
    url, _state = start_authorization(
        state(ctx).store(create=True), client=client, domain=domain.value, base_url=base_url
    )
    say(url)


def refresh_token(
    ctx: typer.Context,
    subdomain: SubdomainOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Refresh now, even if not due.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing unless a person is needed (for cron).")
    ] = False,
):
    """Renew the tokens once half of the access token's life has passed (run it from cron)."""
    from amohook.tokens import all_accounts, refresh_tokens

    st = state(ctx)
    store = st.store()
    accounts = all_accounts(subdomain)
    if not accounts:
        from amohook.errors import AccountNotFound

        raise AccountNotFound(None)
    for account in accounts:

        def on_wait(msg: str, s: str = account.subdomain) -> None:
            if not quiet:  # waiting is routine; if the wait fails, the error says so
                warn(f"{s}: {msg}")

        result = refresh_tokens(store, account.subdomain, force=force, on_wait=on_wait)
        acc = result.account
        if result.outcome == "refreshed":
            if not quiet:
                say(f"{acc.subdomain}: refreshed; access token valid until {human_time(acc.expires_at)}")
        elif result.outcome == "long_lived":
            if not quiet:
                say(f"{acc.subdomain}: long-lived token, nothing to refresh")
        elif result.outcome == "refreshed_by_other":
            if not quiet:
                say(f"{acc.subdomain}: another process has just refreshed; nothing to do")
        elif not quiet:
            from amohook.tokens import refresh_due_at

            say(f"{acc.subdomain}: not due; next refresh after {human_time(refresh_due_at(acc))}")


def status(
    ctx: typer.Context,
    subdomain: SubdomainOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
):
    """Show each account's tokens: expiry, next refresh, refresh-token age, warnings."""
    from amohook.tokens import all_accounts, refresh_holder, token_status

    now = time.time()
    st = state(ctx)
    st.store()
    rows = [token_status(a, now, refresh_holder(a)) for a in all_accounts(subdomain)]
    from amohook.cli.reconcile import describe_row, reconcile_rows

    recon = {row["subdomain"]: row for row in reconcile_rows(now)}
    if as_json:
        print_json(
            [
                {
                    "subdomain": r.subdomain,
                    "base_url": r.base_url,
                    "account_id": r.amo_account_id,
                    "has_tokens": r.has_tokens,
                    "long_lived": r.long_lived,
                    "expires_at": iso_time(r.expires_at),
                    "refresh_due_at": iso_time(r.refresh_due_at),
                    "refresh_token_age_days": None
                    if r.refresh_token_age is None
                    else round(r.refresh_token_age / 86400, 2),
                    "warning": r.warning,
                    "reconciliation": recon.get(r.subdomain),
                }
                for r in rows
            ]
        )
        return
    if not rows:
        from amohook.settings import redact_url

        say(f"no accounts in {redact_url(st.settings.db_url)} — run `amohook init-auth` to add one")
        return
    from amohook.cli.common import console, plain, table

    columns = (
        ("account", "text"),
        ("tokens", "text"),
        ("access token expires", "time"),
        ("next refresh", "time"),
        ("refresh token age", "text"),
        ("warning", "text"),
    )
    cells = []
    for r in rows:
        tokens = "long-lived" if r.long_lived else ("yes" if r.has_tokens else "no")
        expires = human_time(r.expires_at) + (f" (in {format_duration(r.expires_at - now)})" if r.expires_at else "")
        due = "never" if r.long_lived else human_time(r.refresh_due_at)
        cells.append((plain(r.subdomain), tokens, expires, due, format_duration(r.refresh_token_age), plain(r.warning)))
    console().print(table("amohook accounts", columns, cells))
    for r in rows:
        if r.subdomain in recon:
            say(describe_row(recon[r.subdomain]))
    for r in rows:
        if r.warning:
            warn(f"warning: {r.subdomain}: {r.warning}")
