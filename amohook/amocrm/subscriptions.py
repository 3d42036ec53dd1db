"""amoCRM's webhook subscriptions (``/api/v4/webhooks``): list, subscribe, unsubscribe.

amoCRM switches a subscription off after repeated failed deliveries; reading and re-posting it is
how amohook notices and repairs that. Only an account administrator may use these endpoints
(https://www.amocrm.ru/developers/content/crm_platform/webhooks-api). amoCRM matches destinations
exactly, so a destination is sent and compared byte for byte, never normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from amohook.amocrm.client import json_body
from amohook.errors import AmoApiError, ExitCode, Forbidden

WEBHOOKS_PATH = "/api/v4/webhooks"


@dataclass(frozen=True)
class Webhook:
    """One subscription as amoCRM lists it; ``disabled`` is true once amoCRM switched it off."""

    id: int | str | None
    destination: str
    events: tuple[str, ...]
    disabled: bool
    sort: int | None

    @classmethod
    def from_api(cls, item: dict) -> Webhook:
        settings = item.get("settings") or []
        if isinstance(settings, str):
            settings = [settings]
        sort = item.get("sort")
        try:
            sort = int(sort) if sort is not None else None
        except (TypeError, ValueError):
            sort = None
        return cls(
            id=item.get("id"),
            destination=str(item.get("destination") or ""),
            events=tuple(str(s) for s in settings),
            disabled=bool(item.get("disabled")),
            sort=sort,
        )


class AdminRequired(Forbidden):
    """403 from /api/v4/webhooks: the token belongs to a user who is not an account administrator."""

    exit_code = ExitCode.USAGE  # a setup problem: another authorization fixes it, retrying does not

    def __init__(self, subdomain: str, method: str, cause: Forbidden | None = None):
        self.subdomain = subdomain
        info: dict[str, Any] = {}
        if cause is not None:
            info = dict(status=cause.status, title=cause.title, detail=cause.detail, hint=cause.hint, url=cause.url)
        super().__init__(
            f"amoCRM refused {method} {WEBHOOKS_PATH} (403): the token's user is not an administrator of "
            f"'{subdomain}': only an admin may list or change webhook subscriptions — re-run "
            f"`amohook init-auth --subdomain {subdomain}` as an admin, or subscribe in amoCRM's settings",
            **info,
        )


def _call(client, method: str, **kwargs):
    """One request to /api/v4/webhooks; a JSON 403 becomes AdminRequired (an HTML 403 stays a ban)."""
    try:
        return client.request(method, WEBHOOKS_PATH, **kwargs)
    except AdminRequired:
        raise
    except Forbidden as exc:
        raise AdminRequired(client.subdomain, method, exc) from None


def _check_destination(destination: str) -> str:
    if not isinstance(destination, str) or not destination:
        raise ValueError("a webhook destination must be a non-empty string")
    return destination


def list_webhooks(client, destination: str | None = None) -> list[Webhook]:
    """The account's subscriptions; with ``destination``, only the one with exactly that address."""
    params = None
    if destination is not None:
        params = {"filter[destination]": _check_destination(destination)}
    response = _call(client, "GET", params=params)
    if response.status_code == 204 or not response.content:
        return []
    body = json_body(response, "GET", WEBHOOKS_PATH)
    items = ((body or {}).get("_embedded") or {}).get("webhooks") or []
    hooks = [Webhook.from_api(item) for item in items if isinstance(item, dict)]
    if destination is not None:  # amoCRM filters exactly; never accept a looser match
        hooks = [h for h in hooks if h.destination == destination]
    return hooks


def subscribe(client, destination: str, events: Sequence[str]) -> Webhook:
    """Subscribe ``destination`` to ``events`` (amoCRM's codes, e.g. ``status_lead``).

    amoCRM updates an existing subscription of the same destination with these settings
    (crm_platform/webhooks-api). The POST is never re-sent on a timeout or 5xx (it may have landed);
    any 2xx is success. The returned hook is amoCRM's answer, or what was sent if it answered no body.
    """
    _check_destination(destination)
    if isinstance(events, str):
        events = [events]
    settings = [e for e in events if e]
    if not settings or not all(isinstance(e, str) for e in settings):
        raise ValueError("subscribe needs at least one webhook event code, e.g. status_lead")
    response = _call(client, "POST", json={"destination": destination, "settings": settings})
    body = json_body(response, "POST", WEBHOOKS_PATH) if response.status_code != 204 and response.content else None
    if isinstance(body, dict) and isinstance((body.get("_embedded") or {}).get("webhooks"), list):
        body = (body["_embedded"]["webhooks"] or [None])[0]
    if isinstance(body, dict) and body.get("destination"):
        return Webhook.from_api(body)
    return Webhook(id=None, destination=destination, events=tuple(settings), disabled=False, sort=None)


def unsubscribe(client, destination: str) -> bool:
    """Remove the subscription of exactly ``destination``: True if amoCRM removed one, False if it
    had none (404). amoCRM takes the address in a JSON body of the DELETE."""
    _check_destination(destination)
    try:
        _call(client, "DELETE", json={"destination": destination})
    except AmoApiError as exc:
        if exc.status == 404:
            return False
        raise
    return True
