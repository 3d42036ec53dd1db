"""Load, save and refresh an account's tokens, with refreshes serialised across processes.

Refresh tokens are single-use (docs/amocrm.md §2): two processes refreshing the same pair at once burn
it. So a refresh takes the account's lease, re-reads the pair under it, refreshes only if still
needed, and commits the new pair before releasing the lease. The lease is a row claimed by one
atomic UPDATE (``store.lease``), so no database transaction stays open during the HTTP call.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from amohook.durations import format_duration
from amohook.errors import AccountNotFound, AmbiguousAccount, RefreshOutcomeUnknown, TokenMissing, TokenRevoked
from amohook.store.lease import lease
from amohook.store.models import Account
from amohook.times import human_time

if TYPE_CHECKING:  # requests and the OAuth module load only when a refresh is really sent:
    import requests  # cron's `refresh-token` with nothing due should cost little more than Python

    from amohook.amocrm.oauth import Client, TokenPair
    from amohook.store import Store

# The refresh lease. The token request waits for amoCRM's answer for nearly all of it (see
# token_timeout): a late answer that is given up on has still spent the old refresh token, so the
# pair would be lost. A holder killed mid-refresh blocks the next refresh for at most this long
# (cron runs every 30 minutes).
REFRESH_LEASE_TTL = 300.0
# How long a second refresh waits for a live holder before exiting 4 (cron tries again); a holder
# that is a dead process of this host is not waited for at all (store.lease).
REFRESH_LEASE_WAIT = 60.0
TOKEN_CONNECT_TIMEOUT = 5.0
# |clock skew| (s) from which `status` warns; below it is network delay and rounding.
SKEW_WARN = 120.0
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
    store: Store,
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
        refresh_sent_at=None,
        clock_skew=pair.clock_skew,
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
    """Due by this host's clock or by amoCRM's (this clock minus the skew seen at the last
    answer): a host whose clock is behind still refreshes in time, one that is ahead early."""
    due = refresh_due_at(account)
    if due is None:
        return False
    skew = account.clock_skew or 0.0
    return now >= due or now - skew >= due


def token_timeout(lease_ttl: float) -> tuple[float, float]:
    """(connect, read) seconds for the token request: wait for the answer as long as the lease
    allows, less a margin to store the new pair before the lease runs out."""
    margin = min(30.0, lease_ttl / 4)
    connect = min(TOKEN_CONNECT_TIMEOUT, lease_ttl / 4)
    return connect, max(1.0, lease_ttl - margin - connect)


def lost_answer_warning(account: Account, detail: str | None = None) -> str:
    what = f" ({detail})" if detail else ""
    return (
        f"a refresh was sent at {human_time(account.refresh_sent_at)} and no usable answer came back{what}; amoCRM "
        "may already have spent the stored refresh token — the next `amohook refresh-token` "
        "tells: if it says revoked, run `amohook init-auth`"
    )


def refresh_tokens(
    store: Store,
    subdomain: str | None = None,
    *,
    force: bool = False,
    stale_access_token: str | None = None,
    session: requests.Session | None = None,
    clock: Callable[[], float] = time.time,
    timeout=None,
    lease_ttl: float = REFRESH_LEASE_TTL,
    lease_wait: float = REFRESH_LEASE_WAIT,
    on_wait: Callable[[str], None] | None = None,
) -> RefreshResult:
    """Renew the pair if due (or ``force``d, or if ``stale_access_token`` is still the stored one).

    ``stale_access_token`` is for the API client's 401 path: if another process has already
    replaced that token, its fresh pair is used and nothing is sent to amoCRM. ``on_wait`` hears
    why, when the lease is held by another process for more than a moment.
    """
    account = get_account(subdomain)
    if account.long_lived:
        return RefreshResult("long_lived", account)
    if not account.refresh_token:
        raise TokenMissing(account.subdomain)
    wanted = force or stale_access_token is not None
    if not wanted and not is_due(account, clock()):
        return RefreshResult("not_due", account)

    with lease(f"refresh:{account.subdomain}", ttl=lease_ttl, wait=lease_wait, on_wait=on_wait):
        # Re-read under the lease: a process that waited finds the pair another one just made.
        account = Account.get_by_id(account.id)
        if not account.refresh_token:
            raise TokenMissing(account.subdomain)
        if stale_access_token is not None and account.access_token != stale_access_token:
            return RefreshResult("refreshed_by_other", account)
        if stale_access_token is None and not force and not is_due(account, clock()):
            return RefreshResult("refreshed_by_other", account)

        from amohook.amocrm.http import new_session
        from amohook.amocrm.oauth import Client, refresh_pair

        client = Client(account.client_id or "", account.client_secret or "", account.redirect_uri or "")
        spent = account.refresh_token
        sent_at = clock()
        # Written before the request: if this process dies waiting, `status` can tell.
        with store.write():
            Account.update(refresh_sent_at=sent_at).where(Account.id == account.id).execute()
        try:
            pair = refresh_pair(
                session or new_session(),
                account.base_url,
                client,
                spent,
                subdomain=account.subdomain,
                timeout=timeout or token_timeout(lease_ttl),
                clock=clock,
            )
        except RefreshOutcomeUnknown as exc:
            # The marker stays: the old token may be spent. `status` must show it at once.
            account.refresh_sent_at = sent_at
            _record_error(store, account, spent, lost_answer_warning(account, getattr(exc, "what", None)), clock)
            raise
        except TokenRevoked as exc:
            fresh = Account.get_by_id(account.id)
            if fresh.refresh_token != spent:
                # Someone stored a new pair after we read ours (another host, init-auth): the
                # grant is fine, only our copy of the token was old. Our request is answered.
                with store.write():
                    Account.update(refresh_sent_at=None).where(
                        (Account.id == account.id) & (Account.refresh_sent_at == sent_at)
                    ).execute()
                return RefreshResult("refreshed_by_other", Account.get_by_id(account.id))
            _record_error(store, account, spent, exc.message, clock, revoked=True)
            raise
        except Exception:
            # A definite answer or nothing sent (refused, unreachable): nothing was spent.
            _clear_marker(store, account, spent)
            raise
        # Commit the new pair before anyone uses it and before the lease is released.
        with store.write():
            Account.update(
                access_token=pair.access_token,
                refresh_token=pair.refresh_token or spent,
                issued_at=pair.issued_at,
                expires_at=pair.expires_at,
                clock_skew=pair.clock_skew,
                refresh_sent_at=None,
                last_refresh_error=None,
                updated_at=clock(),
            ).where(Account.id == account.id).execute()
        return RefreshResult("refreshed", Account.get_by_id(account.id))


def _record_error(
    store: Store, account: Account, spent: str, message: str | None, clock, *, revoked: bool = False
) -> None:
    """Record a failed refresh, unless the pair was replaced meanwhile (its error is not ours)."""
    fields: dict = {"updated_at": clock()}
    fields["last_refresh_error"] = (message or "")[:1000]
    if revoked:
        fields["refresh_sent_at"] = None  # a definite answer: nothing is in doubt any more
    with store.write():
        Account.update(**fields).where((Account.id == account.id) & (Account.refresh_token == spent)).execute()


def _clear_marker(store: Store, account: Account, spent: str) -> None:
    with store.write():
        Account.update(refresh_sent_at=None).where(
            (Account.id == account.id) & (Account.refresh_token == spent)
        ).execute()


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


def token_status(account: Account, now: float, refresh_holder: tuple[str, float] | None = None) -> TokenStatus:
    """What `amohook status` shows: no secrets, only times and warnings.

    ``refresh_holder``: the live refresh lease (owner, seconds left), if any, to tell a refresh in
    progress from one whose answer was lost. Times are amoCRM's (see oauth.amo_time); a token
    "issued in the future" by this host's clock is shown as age 0, with a warning about the clock.
    """
    has = bool(account.access_token)
    age = (now - account.issued_at) if (has and account.issued_at and not account.long_lived) else None
    warnings: list[str] = []
    if age is not None and age < 0:
        if age < -SKEW_WARN:
            warnings.append(
                f"the tokens were issued {format_duration(-age)} after this host's current time — this host's clock "
                "is behind (or was ahead at the last refresh); set it right (NTP)"
            )
        age = 0.0
    if not has:
        warnings.append(f"no tokens — run `amohook init-auth --subdomain {account.subdomain}`")
    elif account.expires_at is not None and account.expires_at <= now:
        if account.long_lived:
            warnings.append(
                "the long-lived token has expired — generate a new one and run `amohook init-auth --long-lived-token`"
            )
        else:
            warnings.append("the access token has expired — run `amohook refresh-token` (is cron running?)")
    if age is not None and age >= REFRESH_TOKEN_WARN_AGE:
        left = format_duration(max(0.0, REFRESH_TOKEN_LIFETIME - age))
        warnings.append(
            f"the refresh token is {format_duration(age)} old; amoCRM revokes it after 3 months unused "
            f"(about {left} left) — check that cron runs `amohook refresh-token`"
        )
    if account.refresh_sent_at is not None:
        from amohook.store.lease import owner_gone

        if refresh_holder is not None and not owner_gone(refresh_holder[0]):
            warnings.append(
                f"a refresh is in progress: sent at {human_time(account.refresh_sent_at)}, waiting for amoCRM's "
                f"answer (by {refresh_holder[0].rsplit(':', 2)[0]}, lease until {human_time(now + refresh_holder[1])})"
            )
        else:
            warnings.append(account.last_refresh_error or lost_answer_warning(account, "the process ended first"))
    elif account.last_refresh_error:
        warnings.append(account.last_refresh_error)
    skew = account.clock_skew
    if skew is not None and abs(skew) >= SKEW_WARN:
        warnings.append(
            f"at the last token answer this host's clock was {format_duration(abs(skew))} "
            f"{'ahead of' if skew > 0 else 'behind'} amoCRM's — set it right (NTP); token times are amoCRM's"
        )
    return TokenStatus(
        subdomain=account.subdomain,
        base_url=account.base_url,
        amo_account_id=account.amo_account_id,
        has_tokens=has,
        long_lived=bool(account.long_lived),
        expires_at=account.expires_at,
        refresh_due_at=refresh_due_at(account),
        refresh_token_age=age,
        warning="; ".join(warnings) or None,
        last_refresh_error=account.last_refresh_error,
    )


def refresh_holder(account: Account) -> tuple[str, float] | None:
    """The live refresh lease of ``account`` (owner, seconds left), for ``token_status``."""
    from amohook.store.lease import holder_info

    return holder_info(f"refresh:{account.subdomain}")
