"""What every request to amoCRM shares: the session, its identity, its timeouts, problem JSON."""

from __future__ import annotations

import requests

from amohook import __url__, __version__

USER_AGENT = f"amohook/{__version__} (+{__url__})"
# (connect, read) seconds; the official SDK uses 5 and 20.
DEFAULT_TIMEOUT = (5.0, 20.0)


def new_session() -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    session.headers["Accept"] = "application/json"
    return session


def problem(response: requests.Response) -> dict:
    """amoCRM's problem-JSON fields (title, detail, hint, status, validation-errors), or {}."""
    ctype = response.headers.get("Content-Type", "")
    if "json" not in ctype or not response.content:
        return {}
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def is_html(response: requests.Response) -> bool:
    ctype = response.headers.get("Content-Type", "").lower()
    head = response.content[:200].lstrip().lower()
    return "html" in ctype or head.startswith((b"<html", b"<!doctype"))


def short(text: str | None, limit: int = 160) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
