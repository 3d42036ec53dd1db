"""The token endpoint: exchanging a code, refreshing a pair, and explaining amoCRM's refusals.

amoCRM's errors are problem JSON with a ``hint`` rather than RFC 6749 ``error`` codes
(FACTS.md §2), so the hint decides the message. A refresh is never re-sent automatically: refresh
tokens are single-use, and an answer lost on the way may already have spent the old one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import requests

from amohook.amocrm.http import DEFAULT_TIMEOUT, is_html, problem, short
from amohook.errors import (
    AccountBlocked,
    AmoApiError,
    AmoTemporaryError,
    OAuthError,
    RefreshOutcomeUnknown,
    TokenRevoked,
)

KEYS_TAB = "the integration's Keys tab (amoCRM → Settings → Integrations → your integration → Keys and scopes)"


@dataclass(frozen=True)
class TokenPair:
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_in: int
    issued_at: float

    @property
    def expires_at(self) -> float:
        return self.issued_at + self.expires_in


@dataclass(frozen=True)
class Client:
    """The integration's identity at amoCRM, as the token endpoint checks it."""

    client_id: str
    client_secret: str
    redirect_uri: str

    def __repr__(self) -> str:  # never show the secret, even in a traceback
        return f"Client(client_id={self.client_id!r}, redirect_uri={self.redirect_uri!r})"


def exchange_code(
    session: requests.Session,
    base_url: str,
    client: Client,
    code: str,
    *,
    timeout=DEFAULT_TIMEOUT,
    clock=time.time,
) -> TokenPair:
    """Trade a 20-minute authorization code for the first token pair."""
    try:
        response = _token_request(session, base_url, client, timeout, grant_type="authorization_code", code=code)
    except requests.RequestException as exc:
        raise AmoTemporaryError(
            f"no answer from {base_url} ({type(exc).__name__}) — check the address and the network; "
            "if the code was delivered it is now spent, so copy a fresh one before retrying"
        ) from None
    return _pair_or_raise(response, base_url, client, grant="authorization_code", clock=clock)


def _token_request(session: requests.Session, base_url: str, client: Client, timeout, **grant) -> requests.Response:
    """One POST to the token endpoint (JSON, as in every official example)."""
    body = {
        "client_id": client.client_id,
        "client_secret": client.client_secret,
        **grant,
        "redirect_uri": client.redirect_uri,
    }
    return session.post(f"{base_url}/oauth2/access_token", json=body, timeout=timeout)


def refresh_pair(
    session: requests.Session,
    base_url: str,
    client: Client,
    refresh_token: str,
    *,
    subdomain: str,
    timeout=DEFAULT_TIMEOUT,
    clock=time.time,
) -> TokenPair:
    """Spend ``refresh_token`` for a new pair. Sent exactly once, whatever happens."""
    try:
        response = _token_request(
            session, base_url, client, timeout, grant_type="refresh_token", refresh_token=refresh_token
        )
    except requests.ConnectionError as exc:
        if _never_connected(exc):
            raise AmoTemporaryError(
                f"cannot reach {base_url} to refresh the token ({type(exc).__name__}); nothing was "
                "sent, the stored pair is unchanged — cron will try again"
            ) from None
        raise _outcome_unknown(base_url, subdomain, type(exc).__name__) from None
    except requests.Timeout:
        raise _outcome_unknown(base_url, subdomain, "timeout") from None
    except requests.RequestException as exc:
        raise _outcome_unknown(base_url, subdomain, type(exc).__name__) from None
    return _pair_or_raise(response, base_url, client, grant="refresh_token", clock=clock, subdomain=subdomain)


def _never_connected(exc: requests.ConnectionError) -> bool:
    """True when the TCP connection itself failed, so the request certainly never left."""
    text = repr(exc)
    return any(s in text for s in ("NewConnectionError", "NameResolutionError", "Connection refused", "ConnectTimeout"))


def _outcome_unknown(base_url: str, subdomain: str, what: str) -> RefreshOutcomeUnknown:
    return RefreshOutcomeUnknown(
        f"the token refresh was sent to {base_url} but no answer came back ({what}); amoCRM may "
        "already have spent the old refresh token, so amohook did not send it again — run "
        f"`amohook refresh-token --force --subdomain {subdomain}` once; if it reports the token "
        "revoked, run `amohook init-auth` with a new code"
    )


def _pair_or_raise(response, base_url, client: Client, *, grant: str, clock, subdomain: str = "") -> TokenPair:
    if response.status_code == 200:
        try:
            data = response.json()
            return TokenPair(
                access_token=str(data["access_token"]),
                refresh_token=data.get("refresh_token"),
                expires_in=int(data.get("expires_in") or 86400),
                issued_at=float(clock()),
            )
        except (ValueError, KeyError, TypeError):
            raise AmoApiError(
                f"{base_url} answered the token request with something that is not a token — "
                "check --base-url points at the amoCRM account",
                status=200,
            ) from None
    raise _explain(response, base_url, client, grant=grant, subdomain=subdomain)


def _explain(response, base_url, client: Client, *, grant: str, subdomain: str) -> Exception:
    status = response.status_code
    fields = problem(response)
    hint = str(fields.get("hint") or "")
    detail = fields.get("detail")
    info = dict(status=status, title=fields.get("title"), detail=detail, hint=hint or None, url=response.url)
    low = hint.lower()

    if status == 403 and (is_html(response) or not fields):
        return AccountBlocked(
            f"amoCRM refused {base_url} with 403 and an HTML page: API access of this account (or "
            "this IP) is blocked, usually after repeated rate-limit violations — ask amoCRM support "
            "to unblock it",
            **info,
        )
    if status >= 500 or status == 429:
        if grant == "refresh_token":
            return _outcome_unknown(base_url, subdomain, f"HTTP {status}")
        return AmoTemporaryError(f"amoCRM answered the token request with HTTP {status} — try again in a minute", **info)
    if grant == "refresh_token" and ("revoked" in low or "invalid refresh" in low or status == 401 and "client" not in low):
        return TokenRevoked(subdomain, hint or f"HTTP {status}")
    if "has expired" in low:
        return OAuthError(
            f"the authorization code has expired: codes live 20 minutes — copy a fresh one from {KEYS_TAB}",
            **info,
        )
    if "code has been revoked" in low:
        return OAuthError(
            f"this authorization code was already used (a code works once) — copy a fresh one from {KEYS_TAB}",
            **info,
        )
    if "decrypt" in low:
        return OAuthError(
            "amoCRM cannot read this authorization code — check that it was copied whole and that "
            f"--client-id is this integration's ID ({KEYS_TAB})",
            **info,
        )
    if "client" in low or status == 401:
        return OAuthError(
            f"amoCRM rejected the client id or client secret — copy both from {KEYS_TAB}",
            **info,
        )
    if status == 400:
        # A redirect URI that differs even by a trailing slash gives only this generic answer
        # (FACTS.md §2, amocrm-api-php issue #114).
        return OAuthError(
            f"amoCRM refused the request ({short(fields.get('title') or detail or response.text, 80)}): "
            f"usually the redirect URI differs from the integration's — amohook sent "
            f"'{client.redirect_uri}', which must match the integration's setting exactly "
            "(trailing slash included)",
            **info,
        )
    return AmoApiError(f"amoCRM answered the token request with HTTP {status}: {short(hint or detail or response.text)}", **info)
