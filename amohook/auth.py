"""Getting a grant: the code exchange, a long-lived token, and the redirect flow with `state`."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import requests

from amohook.amocrm.http import new_session
from amohook.amocrm.oauth import Client, TokenPair, exchange_code
from amohook.errors import ConfigError, OAuthError, Unauthorized
from amohook.settings import base_url_for, check_subdomain
from amohook.store.models import Account, OAuthState
from amohook.tokens import jwt_expiry, save_authorization

if TYPE_CHECKING:
    from amohook.store import Store

AUTHORIZE_HOSTS = {
    "amocrm.ru": "https://www.amocrm.ru",
    "amocrm.com": "https://www.amocrm.com",
    "kommo.com": "https://www.kommo.com",
}
STATE_MAX_AGE = 3600  # an authorization page left open longer than this must be started again


def authorize_with_code(
    store: Store,
    *,
    subdomain: str,
    base_url: str,
    client: Client,
    code: str,
    session: requests.Session | None = None,
    clock: Callable[[], float] = time.time,
) -> Account:
    """Exchange the code, store the pair at once (the code is spent), then prove it works."""
    session = session or new_session()
    pair = exchange_code(session, base_url, client, code.strip(), clock=clock)
    account = save_authorization(store, subdomain=subdomain, base_url=base_url, client=client, pair=pair, clock=clock)
    return verify_account(store, account.subdomain, session=session)


def authorize_with_long_lived_token(
    store: Store,
    *,
    subdomain: str,
    base_url: str,
    token: str,
    session: requests.Session | None = None,
    clock: Callable[[], float] = time.time,
) -> Account:
    """Store a long-lived token (no refresh token; never refreshed) after checking it works."""
    token = token.strip()
    now = clock()
    expires = jwt_expiry(token)
    pair = TokenPair(access_token=token, refresh_token=None, expires_in=int((expires or now) - now), issued_at=now)
    existing = Account.get_or_none(Account.subdomain == subdomain)
    if existing is not None and existing.access_token and not existing.long_lived:
        pass  # replacing an OAuth pair by a long-lived token is allowed; the old pair is dropped
    account = save_authorization(
        store, subdomain=subdomain, base_url=base_url, client=None, pair=pair, long_lived=True, clock=clock
    )
    if expires is None:
        Account.update(expires_at=None).where(Account.id == account.id).execute()
    try:
        return verify_account(store, account.subdomain, session=session)
    except Unauthorized:
        with store.write():
            Account.update(access_token=None).where(Account.id == account.id).execute()
        raise OAuthError(
            "amoCRM rejected this long-lived token — check it was copied whole and belongs to this "
            "account, or generate a new one in the integration's Keys tab"
        ) from None


def verify_account(store: Store, subdomain: str, *, session: requests.Session | None = None) -> Account:
    """GET /api/v4/account with the stored token; records the account id and timezone."""
    from amohook.amocrm.client import client_for

    client = client_for(store, subdomain, session=session or new_session())
    info = client.account_info(("datetime_settings",))
    # The docs do not show where `datetime_settings` sits; accept it at the top or under _embedded.
    settings = info.get("datetime_settings") or (info.get("_embedded") or {}).get("datetime_settings") or {}
    timezone = settings.get("timezone") if isinstance(settings, dict) else None
    with store.write():
        Account.update(amo_account_id=info.get("id"), timezone=timezone).where(Account.subdomain == subdomain).execute()
    return Account.get(Account.subdomain == subdomain)


def start_authorization(
    store: Store,
    *,
    client: Client,
    domain: str = "amocrm.ru",
    base_url: str | None = None,
    clock: Callable[[], float] = time.time,
) -> tuple[str, str]:
    """The URL the admin opens to grant access, with a random ``state`` remembered in the store."""
    if domain not in AUTHORIZE_HOSTS:
        raise ConfigError(f"unknown domain '{domain}' — use one of {', '.join(AUTHORIZE_HOSTS)}")
    state = secrets.token_urlsafe(24)
    with store.write():
        # Authorizations never completed keep a client secret: drop them once they are too old.
        OAuthState.delete().where(OAuthState.created_at < clock() - STATE_MAX_AGE).execute()
        OAuthState.create(
            state=state,
            client_id=client.client_id,
            client_secret=client.client_secret,
            redirect_uri=client.redirect_uri,
            base_url=base_url,
            domain=domain,
            created_at=clock(),
        )
    query = urlencode({"client_id": client.client_id, "state": state, "mode": "post_message"})
    return f"{AUTHORIZE_HOSTS[domain]}/oauth?{query}", state


def complete_authorization(
    store: Store,
    *,
    state: str,
    code: str,
    referer: str | None,
    session: requests.Session | None = None,
    clock: Callable[[], float] = time.time,
) -> Account:
    """Finish what `auth-url` started: the state must be known, unused and recent.

    Every parameter is checked before the state is spent, so a malformed redirect (or a stray
    request to the address) cannot use up the admin's authorization.
    """
    from amohook.redact import hold_secret

    hold_secret(state, code, lasting=False)  # the state is looked up next: peewee's log shows it
    if not code or not code.strip():
        raise ConfigError("amoCRM's redirect carried no code — start again with `amohook auth-url`")
    if not referer:
        raise ConfigError(
            "amoCRM's redirect carried no referer (the account's address) — start again with `amohook auth-url`"
        )
    # referer is the account host without scheme, e.g. "example.amocrm.ru" (docs/amocrm.md §1).
    host = referer.strip().split("/")[0]
    subdomain = check_subdomain(host)
    with store.write():
        pending = OAuthState.get_or_none(OAuthState.state == state) if state else None
        if pending is None:
            raise ConfigError("unknown authorization state — start again with `amohook auth-url`")
        if pending.used_at is not None:
            raise ConfigError("this authorization was already completed — start again with `amohook auth-url`")
        if clock() - pending.created_at > STATE_MAX_AGE:
            raise ConfigError("this authorization link is more than an hour old — start again with `amohook auth-url`")
        secret = pending.client_secret
        # The row kept the client secret only for this exchange.
        OAuthState.update(used_at=clock(), client_secret="").where(OAuthState.state == state).execute()
    base_url = pending.base_url or base_url_for(subdomain, base_url=f"https://{host}")
    client = Client(pending.client_id, secret, pending.redirect_uri)
    return authorize_with_code(
        store, subdomain=subdomain, base_url=base_url, client=client, code=code, session=session, clock=clock
    )
