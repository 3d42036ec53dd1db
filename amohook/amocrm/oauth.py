"""The token endpoint: exchanging a code, refreshing a pair, and explaining amoCRM's refusals.

amoCRM's errors are problem JSON with a ``hint`` rather than RFC 6749 ``error`` codes
(docs/amocrm.md §2), so the hint decides the message. A refresh is never re-sent automatically: refresh
tokens are single-use, and an answer lost on the way may already have spent the old one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import requests

from amohook.amocrm.http import DEFAULT_TIMEOUT, is_html, problem, short
from amohook.errors import (
    AccountBlocked,
    AmoApiError,
    AmoTemporaryError,
    Forbidden,
    OAuthError,
    PaymentRequired,
    RefreshOutcomeUnknown,
    TokenRevoked,
)

KEYS_TAB = "the integration's Keys tab (amoCRM → Settings → Integrations → your integration → Keys and scopes)"


@dataclass(frozen=True)
class TokenPair:
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_in: int
    issued_at: float  # amoCRM's time of the answer (server_time, else Date), else this host's
    clock_skew: float | None = None  # this host's clock minus amoCRM's, when amoCRM's time was known

    def __post_init__(self) -> None:
        from amohook.redact import hold_secret

        hold_secret(self.access_token, self.refresh_token, lasting=False)  # before any log line may hold them

    @property
    def expires_at(self) -> float:
        return self.issued_at + self.expires_in


@dataclass(frozen=True)
class Client:
    """The integration's identity at amoCRM, as the token endpoint checks it."""

    client_id: str
    client_secret: str
    redirect_uri: str

    def __post_init__(self) -> None:
        from amohook.redact import hold_secret

        hold_secret(self.client_secret)  # before any log line may hold it

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


def _outcome_unknown(base_url: str, subdomain: str, what: str, *, answered: bool = False) -> RefreshOutcomeUnknown:
    if answered:
        head = f"the token refresh sent to {base_url} got an answer that is not a token ({what})"
    else:
        head = f"the token refresh was sent to {base_url} but no answer came back ({what})"
    exc = RefreshOutcomeUnknown(
        f"{head}; amoCRM may "
        "already have spent the old refresh token, so amohook did not send it again — run "
        f"`amohook refresh-token --force --subdomain {subdomain}` once; if it reports the token "
        "revoked, run `amohook init-auth` with a new code"
    )
    exc.what = what
    return exc


# A token lives a day; anything outside this is not an answer to trust.
EXPIRES_IN_RANGE = (60, 10 * 366 * 86400)


def amo_time(response, data) -> float | None:
    """amoCRM's clock at the answer: the body's ``server_time`` (documented in the token
    response, https://www.amocrm.ru/developers/content/oauth/step-by-step), else the ``Date`` header."""
    st = data.get("server_time") if isinstance(data, dict) else None
    if isinstance(st, (int, float)) and not isinstance(st, bool) and 1e9 < st < 1e11:
        return float(st)
    date = response.headers.get("Date")
    if date:
        try:
            return parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return None


def _token_fields(data) -> tuple[str, str | None, int] | None:
    """(access, refresh, expires_in) when ``data`` is really a token answer, else None."""
    if not isinstance(data, dict):
        return None
    access, refresh, expires_in = data.get("access_token"), data.get("refresh_token"), data.get("expires_in", 86400)
    if not isinstance(access, str) or not access.strip():
        return None
    if refresh is not None and (not isinstance(refresh, str) or not refresh.strip()):
        return None
    try:
        expires_in = int(expires_in)
    except (TypeError, ValueError):
        return None
    if not EXPIRES_IN_RANGE[0] <= expires_in <= EXPIRES_IN_RANGE[1]:
        return None
    return access, refresh, expires_in


def _pair_or_raise(response, base_url, client: Client, *, grant: str, clock, subdomain: str = "") -> TokenPair:
    if response.status_code == 200:
        local = float(clock())
        try:
            data = response.json()
        except ValueError:
            data = None
        fields = _token_fields(data)
        if fields is None:
            what = (
                "HTTP 200 with an HTML page"
                if is_html(response)
                else "HTTP 200 with JSON but no usable access_token"
                if isinstance(data, dict)
                else "HTTP 200 with something that is not JSON"
            )
            if grant == "refresh_token":
                # The request reached amoCRM: like a lost answer, the old refresh token may be spent.
                raise _outcome_unknown(base_url, subdomain, what, answered=True)
            raise OAuthError(
                f"{base_url} answered the token request with something that is not a token ({what}) — "
                "check --base-url points at the amoCRM account, then copy a fresh code",
                status=200,
            )
        access, refresh, expires_in = fields
        amo = amo_time(response, data)
        return TokenPair(
            access_token=access,
            refresh_token=refresh,
            expires_in=expires_in,
            issued_at=amo if amo is not None else local,
            clock_skew=None if amo is None else local - amo,
        )
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
        return AmoTemporaryError(
            f"amoCRM answered the token request with HTTP {status} — try again in a minute", **info
        )
    if status == 402:
        return PaymentRequired(
            f"amoCRM answered the token request with 402: the account at {base_url} is not paid or its "
            "subscription is over — its owner renews it in amoCRM (the stored tokens are unchanged)",
            **info,
        )
    if status == 403:
        return Forbidden(
            f"amoCRM refused the token request with 403 ({short(hint or detail or fields.get('title'), 80)}): "
            "access to the account is forbidden from this address or to this integration — check the account's "
            "IP restrictions and that the integration is still installed",
            **info,
        )
    if grant == "refresh_token" and (
        "revoked" in low or "invalid refresh" in low or status == 401 and "client" not in low
    ):
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
        # (docs/amocrm.md §2, amocrm-api-php issue #114).
        return OAuthError(
            f"amoCRM refused the request ({short(fields.get('title') or detail or response.text, 80)}): "
            f"usually the redirect URI differs from the integration's — amohook sent "
            f"'{client.redirect_uri}', which must match the integration's setting exactly "
            "(trailing slash included)",
            **info,
        )
    return AmoApiError(
        f"amoCRM answered the token request with HTTP {status}: {short(hint or detail or response.text)}", **info
    )
