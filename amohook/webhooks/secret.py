"""The webhook secret and the URL to give amoCRM.

An explicitly configured secret (``AMOHOOK_WEBHOOK_SECRET``, ``--secret``) always wins. Without
one, `serve` makes one up once and keeps it in the store (table ``store_setting``), so the URL
amoCRM was given survives restarts and moves with the store; `amohook webhooks url` prints it
again. The secret is shown by that command only: never logged, never in any other output.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from amohook.errors import ConfigError

if TYPE_CHECKING:
    from amohook.store.db import Store

SETTING = "webhook_secret"
ENV_PUBLIC_URL = "AMOHOOK_PUBLIC_URL"


def stored_secret(store: Store) -> str | None:
    """The secret `serve` generated and kept in this store, or None."""
    from amohook.store.models import StoreSetting

    row = StoreSetting.get_or_none(StoreSetting.name == SETTING)
    return None if row is None else row.value


def keep_secret(store: Store) -> str:
    """The store's webhook secret, made (and committed) now if it has none yet. Processes starting
    at once agree: the first insert wins, and everyone reads what it wrote."""
    from amohook.store.models import StoreSetting
    from amohook.webhooks.server import check_secret

    with store.write():
        StoreSetting.insert(name=SETTING, value=secrets.token_urlsafe(24)).on_conflict_ignore().execute()
    value = stored_secret(store)
    return check_secret(value)


def check_public_url(url: str | None) -> str:
    """The address amoCRM reaches the listener at (through the TLS proxy), without a trailing slash."""
    if not url:
        raise ConfigError(
            f"give the listener's public address — --public-url https://hooks.example.com (or {ENV_PUBLIC_URL}): "
            "the https address your TLS proxy answers at"
        )
    parts = urlsplit(url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or any(c.isspace() for c in url)
        or len(url) > 1000
    ):
        raise ConfigError(
            f"--public-url must be an http(s) address without query, such as https://hooks.example.com "
            f"or https://example.com/amohook (got '{url[:100]}')"
        )
    return url.rstrip("/")


def webhook_url(public_url: str, secret: str) -> str:
    """The destination to give amoCRM: the listener's route under the public address."""
    return f"{check_public_url(public_url)}/webhook/{secret}"
