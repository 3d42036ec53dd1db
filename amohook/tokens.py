"""Load, save and refresh an account's tokens, with refreshes serialised across processes.

Refresh tokens are single-use (FACTS.md §2): two processes refreshing the same pair at once burn
it. So a refresh takes the account's lease, re-reads the pair under it, refreshes only if still
needed, and commits the new pair before releasing the lease. The lease is a row claimed by one
atomic UPDATE (``store.lease``), so no database transaction stays open during the HTTP call.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from amohook.errors import AccountNotFound, AmbiguousAccount, RefreshOutcomeUnknown, TokenMissing, TokenRevoked
from amohook.store.lease import lease
from amohook.store.models import Account

if TYPE_CHECKING:  # requests and the OAuth module load only when a refresh is really sent:
    import requests  # cron's `refresh-token` with nothing due should cost little more than Python

    from amohook.amocrm.oauth import Client, TokenPair

# Far longer than the token request can take (connect 5 s + read 20 s per read, so a slow answer
# trickling in could pass 25 s), so a live holder does not lose it; a holder killed mid-refresh
# blocks the next refresh for at most this long (cron runs every 30 minutes).
REFRESH_LEASE_TTL = 300.0
REFRESH_LEASE_WAIT = 330.0
# amoCRM revokes a refresh token unused for 3 months; warn a month ahead.
REFRESH_TOKEN_LIFETIME = 90 * 86400
REFRESH_TOKEN_WARN_AGE = 60 * 86400


@dataclass(frozen=True)
class RefreshResult:
    outcome: str  # refreshed, not_due, long_lived, refreshed_by_other
    account: Account

    @property
    def refreshed(self) -> bool:
        return self.outcome == "refreshed"


def get_account(subdomain: str | None = None) -> Account:
    """The named account, or the only one stored."""
    if subdomain:
        account = Account.get_or_none(Account.subdomain == subdomain)
        if account is None:
            raise AccountNotFound(subdomain)
        return account
    accounts = list(Account.select().order_by(Account.subdomain).limit(10))
    if not accounts:
        raise AccountNotFound(None)
    if len(accounts) > 1:
        raise AmbiguousAccount([a.subdomain for a in accounts])
    return accounts[0]


def all_accounts(subdomain: str | None = None) -> list[Account]:
    if subdomain:
        return [get_account(subdomain)]
    return list(Account.select().order_by(Account.subdomain))


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT access token, read without verifying (amoCRM does not publish its key)."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        exp = json.loads(base64.urlsafe_b64decode(payload)).get("exp")
        return float(exp) if exp else None
    except (IndexError, ValueError, AttributeError, TypeError):
        return None


def save_authorization(
    store,
    *,
    subdomain: str,
    base_url: str,
    client: Client | None,
    pair: TokenPair,
    long_lived: bool = False,
    clock: Callable[[], float] = time.time,
) -> Account:
    """Create or replace the account's grant in one transaction."""
    fields = dict(
        base_url=base_url,
        access_token=pair.access_token,
        refresh_token=pair.refresh_token,
        issued_at=pair.issued_at,
        expires_at=pair.expires_at,
        long_lived=long_lived,
        last_refresh_error=None,
        updated_at=clock(),
    )
    if client is not None:
        fields.update(client_id=client.client_id, client_secret=client.client_secret, redirect_uri=client.redirect_uri)
    with store.write():
        account = Account.get_or_none(Account.subdomain == subdomain)
        if account is None:
            account = Account.create(subdomain=subdomain, created_at=clock(), **fields)
        else:
            Account.update(**fields).where(Account.id == account.id).execute()
            account = Account.get_by_id(account.id)
    return account


def refresh_due_at(account: Account) -> float | None:
    """Half-way through the access token's life, or None when there is nothing to refresh."""
    if account.long_lived or not account.refresh_token or account.expires_at is None:
        return None
    issued = account.issued_at if account.issued_at is not None else account.expires_at - 86400
    return issued + (account.expires_at - issued) / 2


def is_due(account: Account, now: float) -> bool:
    due = refresh_due_at(account)
    return due is not None and now >= due


def refresh_tokens(
    store,
    subdomain: str | None = None,
    *,
    force: bool = False,
    stale_access_token: str | None = None,
    session: requests.Session | None = None,
    clock: Callable[[], float] = time.time,
    timeout=None,
    lease_ttl: float = REFRESH_LEASE_TTL,
    lease_wait: float = REFRESH_LEASE_WAIT,
) -> RefreshResult:
    """Renew the pair if due (or ``force``d, or if ``stale_access_token`` is still the stored one).

    ``stale_access_token`` is for the API client's 401 path: if another process has already
    replaced that token, its fresh pair is used and nothing is sent to amoCRM.
    """
    account = get_account(subdomain)
    if account.long_lived:
        return RefreshResult("long_lived", account)
    if not account.refresh_token:
        raise TokenMissing(account.subdomain)
    wanted = force or stale_access_token is not None
    if not wanted and not is_due(account, clock()):
        return RefreshResult("not_due", account)

    with lease(f"refresh:{account.subdomain}", ttl=lease_ttl, wait=lease_wait, clock=clock):
        # Re-read under the lease: a process that waited finds the pair another one just made.
        account = Account.get_by_id(account.id)
        if not account.refresh_token:
            raise TokenMissing(account.subdomain)
        if stale_access_token is not None and account.access_token != stale_access_token:
            return RefreshResult("refreshed_by_other", account)
        if stale_access_token is None and not force and not is_due(account, clock()):
            return RefreshResult("refreshed_by_other", account)

        from amohook.amocrm.http import DEFAULT_TIMEOUT, new_session
        from amohook.amocrm.oauth import Client, refresh_pair

        client = Client(account.client_id or "", account.client_secret or "", account.redirect_uri or "")
        try:
            pair = refresh_pair(
                session or new_session(),
                account.base_url,
                client,
                account.refresh_token,
                subdomain=account.subdomain,
                timeout=timeout or DEFAULT_TIMEOUT,
                clock=clock,
            )
        except (RefreshOutcomeUnknown, TokenRevoked) as exc:
            # `status` must show it at once, not when the access token runs out.
            _record_error(store, account, exc.message, clock)
            raise
        # Commit the new pair before anyone uses it and before the lease is released.
        with store.write():
            Account.update(
                access_token=pair.access_token,
                refresh_token=pair.refresh_token or account.refresh_token,
                issued_at=pair.issued_at,
                expires_at=pair.expires_at,
                last_refresh_error=None,
                updated_at=clock(),
            ).where(Account.id == account.id).execute()
        return RefreshResult("refreshed", Account.get_by_id(account.id))


def _record_error(store, account: Account, message: str, clock) -> None:
    with store.write():
        Account.update(last_refresh_error=message[:1000], updated_at=clock()).where(Account.id == account.id).execute()


@dataclass(frozen=True)
class TokenStatus:
    subdomain: str
    base_url: str
    amo_account_id: int | None
    has_tokens: bool
    long_lived: bool
    expires_at: float | None
    refresh_due_at: float | None
    refresh_token_age: float | None
    warning: str | None
    last_refresh_error: str | None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def token_status(account: Account, now: float) -> TokenStatus:
    """What `amohook status` shows: no secrets, only times and warnings."""
    has = bool(account.access_token)
    age = (now - account.issued_at) if (has and account.issued_at and not account.long_lived) else None
    warning = None
    if not has:
        warning = f"no tokens — run `amohook init-auth --subdomain {account.subdomain}`"
    elif account.expires_at is not None and account.expires_at <= now:
        if account.long_lived:
            warning = "the long-lived token has expired — generate a new one and run `amohook init-auth --long-lived-token`"
        else:
            warning = "the access token has expired — run `amohook refresh-token` (is cron running?)"
    if age is not None and age >= REFRESH_TOKEN_WARN_AGE:
        days_left = max(0, int((REFRESH_TOKEN_LIFETIME - age) // 86400))
        warning = (
            f"the refresh token is {int(age // 86400)} days old; amoCRM revokes it after 3 months unused "
            f"(about {days_left} days left) — check that cron runs `amohook refresh-token`"
        )
    if account.last_refresh_error and not warning:
        warning = account.last_refresh_error
    return TokenStatus(
        subdomain=account.subdomain,
        base_url=account.base_url,
        amo_account_id=account.amo_account_id,
        has_tokens=has,
        long_lived=bool(account.long_lived),
        expires_at=account.expires_at,
        refresh_due_at=refresh_due_at(account),
        refresh_token_age=age,
        warning=warning,
        last_refresh_error=account.last_refresh_error,
    )
