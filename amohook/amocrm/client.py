"""The amoCRM API v4 client every feature uses: tokens, paging, limits, retries, typed errors.

One ``requests.Session`` per account. The access token is read from the store before each request,
so a pair renewed by another process is picked up at once. On 401 the client refreshes through the
same leased refresh as `amohook refresh-token` and repeats the request once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests

from amohook.amocrm.http import DEFAULT_TIMEOUT, is_html, new_session, problem, short
from amohook.amocrm.ratelimit import Limiter, NoLimit
from amohook.errors import (
    AccountBlocked,
    AmoApiError,
    AmoTemporaryError,
    Forbidden,
    MalformedAnswer,
    PaymentRequired,
    RateLimited,
    RefusedBeforeRefresh,
    TokenMissing,
    Unauthorized,
    ValidationFailed,
)
from amohook.retry import CLIENT_READ, RATE_LIMITED, parse_retry_after
from amohook.store.models import Account

if TYPE_CHECKING:
    from amohook.store import Store

PAGE_LIMIT = 250  # amoCRM's maximum page size (docs/amocrm.md §3)
MAX_RETRY_AFTER = 60.0


class AmoClient:
    """API v4 for one stored account. Reads retry on 429/5xx/timeouts; writes retry only on 429."""

    def __init__(
        self,
        store: Store,
        subdomain: str,
        *,
        session: requests.Session | None = None,
        limiter: Limiter | None = None,
        timeout=DEFAULT_TIMEOUT,
        max_attempts: int = 5,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.store = store
        self.subdomain = subdomain
        self.session = session or new_session()
        self.limiter = limiter or NoLimit()
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.clock = clock
        self.sleep = sleep
        self.requests_made = 0
        self.rate_limited = 0
        # This host's clock minus amoCRM's at the last answer that carried a Date header (seconds),
        # None until one did: reconciliation bounds its window by amoCRM's clock with it.
        self.clock_skew: float | None = None

    # -- account and token -------------------------------------------------------------------
    def _account(self) -> Account:
        account = Account.get_or_none(Account.subdomain == self.subdomain)
        if account is None or not account.access_token:
            raise TokenMissing(self.subdomain)
        return account

    def _url(self, base_url: str, path_or_url: str) -> str:
        """Absolute HAL links are re-rooted on the stored base URL (proxies, tests)."""
        if path_or_url.startswith(("http://", "https://")):
            parts = urlsplit(path_or_url)
            path_or_url = parts.path + (f"?{parts.query}" if parts.query else "")
        return base_url.rstrip("/") + "/" + path_or_url.lstrip("/")

    # -- the one request path ----------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict | None = None,
        json: Any = None,
        repeat_after_refresh: bool = True,
    ) -> requests.Response:
        """Send one API request with limits, token refresh and retries; returns a 2xx response.

        ``repeat_after_refresh=False``: on a 401 the token is refreshed but the request is not sent
        again (``RefusedBeforeRefresh``) — for callers whose right to send may lapse while a
        refresh waits on its lease (the action sender).
        """
        is_read = method.upper() in ("GET", "HEAD")
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            account = self._account()
            url = self._url(account.base_url, path)
            self.limiter.acquire(self.subdomain)
            self.requests_made += 1
            try:
                response = self.session.request(
                    method,
                    url,
                    params=params,
                    json=json,
                    headers={"Authorization": f"Bearer {account.access_token}"},
                    timeout=self.timeout,
                )
            except requests.RequestException as exc:
                what = type(exc).__name__
                if is_read and attempt < self.max_attempts:
                    self.sleep(CLIENT_READ.delay(attempt))
                    continue
                hint = "" if is_read else " (a write is never re-sent automatically: it may have reached amoCRM)"
                raise AmoTemporaryError(f"no answer from amoCRM for {method} {path}: {what}{hint}", url=url) from None

            self._note_clock(response)
            status = response.status_code
            if status < 300:
                return response
            if status == 401 and not refreshed and not account.long_lived:
                from amohook.tokens import refresh_tokens  # local: tokens imports this package

                refreshed = True
                refresh_tokens(self.store, self.subdomain, stale_access_token=account.access_token, clock=self.clock)
                if not repeat_after_refresh:
                    raise RefusedBeforeRefresh(
                        f"amoCRM answered 401 to {method} {path}; the token is refreshed, send it again",
                        status=401,
                        url=url,
                    )
                attempt -= 1  # the repeat after a refresh is not a retry
                continue
            if status == 429:
                self.rate_limited += 1
                wait = parse_retry_after(response.headers.get("Retry-After"), cap=MAX_RETRY_AFTER)
                if attempt < self.max_attempts:
                    self.sleep(wait if wait is not None else RATE_LIMITED.delay(attempt))
                    continue
                raise RateLimited(
                    f"amoCRM kept answering 429 (too many requests) to {method} {path}",
                    retry_after=wait,
                    status=429,
                    url=url,
                )
            if status >= 500 and is_read and attempt < self.max_attempts:
                self.sleep(CLIENT_READ.delay(attempt))
                continue
            raise self._error(response, method, path, account)

    def _note_clock(self, response: requests.Response) -> None:
        """Keep amoCRM's clock as its ``Date`` header gave it (RFC 9110: whole seconds, so the middle
        of that second is taken)."""
        date = response.headers.get("Date")
        if not date:
            return
        from email.utils import parsedate_to_datetime

        try:
            amo = parsedate_to_datetime(date).timestamp() + 0.5
        except (TypeError, ValueError, IndexError, OverflowError):
            return
        self.clock_skew = self.clock() - amo

    def _error(self, response: requests.Response, method: str, path: str, account: Account) -> AmoApiError:
        status = response.status_code
        fields = problem(response)
        info: dict[str, Any] = dict(
            status=status,
            title=fields.get("title"),
            detail=fields.get("detail"),
            hint=fields.get("hint"),
            validation_errors=fields.get("validation-errors"),
            url=response.url,
        )
        what = short(fields.get("detail") or fields.get("title") or response.text, 120)
        if status == 403 and (is_html(response) or not fields):
            # amoCRM's ban for repeated rate-limit violations: an HTML page, not problem JSON.
            return AccountBlocked(
                f"amoCRM blocked API access for '{self.subdomain}' (403 with an HTML page), usually after "
                "repeated rate-limit violations — stop all amohook processes and ask amoCRM support to unblock it",
                **info,
            )
        if status == 401:
            if account.long_lived:
                return Unauthorized(
                    f"amoCRM rejected the long-lived token of '{self.subdomain}' (expired or revoked) — "
                    "generate a new one and run `amohook init-auth --long-lived-token`",
                    **info,
                )
            return Unauthorized(
                f"amoCRM still answers 401 for '{self.subdomain}' after a token refresh (integration "
                f"disabled?) — run `amohook init-auth --subdomain {self.subdomain}`",
                **info,
            )
        if status == 403:
            return Forbidden(
                f"amoCRM refused {method} {path} (403: {what}) — the token's user lacks this right", **info
            )
        if status == 400 and fields.get("validation-errors") is not None:
            return ValidationFailed(f"amoCRM rejected {method} {path}: {what}", **info)
        if status == 402:
            return PaymentRequired(
                f"amoCRM answered 402 for {method} {path}: the account's subscription is not paid", **info
            )
        if status >= 500:
            return AmoTemporaryError(f"amoCRM answered {status} to {method} {path}: {what}", **info)
        return AmoApiError(f"amoCRM answered {status} to {method} {path}: {what}", **info)

    # -- conveniences ------------------------------------------------------------------------
    def get(self, path: str, params: dict | None = None) -> dict | None:
        """A JSON object, or None for amoCRM's 204 ("no such entity" / empty list)."""
        response = self.request("GET", path, params=params)
        if response.status_code == 204 or not response.content:
            return None
        return json_body(response, "GET", path)

    def post(self, path: str, json: Any, *, repeat_after_refresh: bool = True) -> dict | None:
        response = self.request("POST", path, json=json, repeat_after_refresh=repeat_after_refresh)
        if response.status_code == 204 or not response.content:
            return None
        return json_body(response, "POST", path)

    def patch(self, path: str, json: Any, *, repeat_after_refresh: bool = True) -> dict | None:
        response = self.request("PATCH", path, json=json, repeat_after_refresh=repeat_after_refresh)
        if response.status_code == 204 or not response.content:
            return None
        return json_body(response, "PATCH", path)

    def iter_pages(self, path: str, key: str, params: dict | None = None, limit: int = PAGE_LIMIT) -> Iterator[dict]:
        """Every item of a HAL list, following ``_links.next`` until 204 or no next link."""
        query = dict(params or {})
        query.setdefault("limit", limit)
        next_ref: str | None = path
        seen: set[str] = set()
        first = True
        while next_ref:
            page = self.get(next_ref, query if first else None)
            first = False
            if page is None:
                return
            items, href = _hal_page(page, path, key)
            yield from items
            if not href:
                return
            ref = self._url("", href)
            if ref in seen:
                raise MalformedAnswer(
                    f"amoCRM's paging for {path} points back to a page already read ({short(ref, 120)}); stopped"
                )
            seen.add(ref)
            next_ref = ref

    def account_info(self, with_: tuple[str, ...] = ()) -> dict:
        params = {"with": ",".join(with_)} if with_ else None
        data = self.get("/api/v4/account", params)
        if data is None:
            raise AmoApiError("amoCRM answered /api/v4/account with no content")
        return data


def _hal_page(page: Any, path: str, key: str) -> tuple[list, str | None]:
    """(``_embedded[key]``, the ``next`` href) of a HAL page; any other shape is amoCRM's fault."""

    def bad(what: str) -> MalformedAnswer:
        return MalformedAnswer(f"amoCRM answered GET {path} with {what}, not the documented HAL page")

    if not isinstance(page, dict):
        raise bad(f"a JSON {type(page).__name__} instead of an object")
    embedded = page.get("_embedded") or {}
    items = embedded.get(key) if isinstance(embedded, dict) else None
    if not isinstance(embedded, dict) or not isinstance(items, (list, type(None))):
        raise bad(f"`_embedded.{key}` that is not a list")
    links = page.get("_links") or {}
    link = links.get("next") if isinstance(links, dict) else None
    if not isinstance(links, dict) or not isinstance(link, (dict, type(None))):
        raise bad("a `next` link that is not an object")
    href = (link or {}).get("href")
    if not isinstance(href, (str, type(None))):
        raise bad("a `next` href that is not a URL")
    return items or [], href or None


def json_body(response: requests.Response, method: str, path: str) -> Any:
    """The JSON of a 2xx answer; a proxy's HTML page in its place is a typed error, not a crash."""
    try:
        return response.json()
    except ValueError:
        raise AmoApiError(
            f"amoCRM answered {method} {path} with {response.status_code} but a body that is not JSON "
            f"({short(response.headers.get('Content-Type') or 'no content type', 60)}: {short(response.text, 80)})",
            status=response.status_code,
            url=response.url,
        ) from None


def client_for(store: Store, subdomain: str, *, shared_limit: bool = True, **kwargs) -> AmoClient:
    """The usual client: rate-limited through the store so all processes share amoCRM's limit."""
    if shared_limit and "limiter" not in kwargs:
        from amohook.amocrm.ratelimit import SharedRateLimiter

        kwargs["limiter"] = SharedRateLimiter(store)
    return AmoClient(store, subdomain, **kwargs)
