"""Reading amoCRM's activity log (``GET /api/v4/events``): one closed time window, complete and sorted.

The log is the safety net for webhooks amoCRM gave up on. Its paging is by offset over a list whose
order is not documented and which grows while it is read, so a window is fetched with the SAME fixed
upper bound on every page, de-duplicated by event id and sorted here, never trusted as served.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from urllib.parse import parse_qs, urlsplit

from amohook.errors import AmoApiError, MalformedAnswer

log = logging.getLogger(__name__)

# amoCRM's documented maximum page size for events ("Максимум – 100",
# https://www.amocrm.ru/developers/content/crm_platform/events-and-notes). A larger limit is known to
# answer 50 items and no `next` link, so a client paging by `next` would stop early and silently.
EVENT_PAGE_LIMIT = 100
EVENTS_PATH = "/api/v4/events"


def event_sort_key(event: dict) -> tuple[int, str]:
    """(created_at, id): ids are ULID-like strings with a millisecond prefix, so ties sort by time too."""
    return int(event.get("created_at") or 0), str(event.get("id"))


def fetch_events(
    client,
    *,
    types: Sequence[str],
    created_from: int,
    created_to: int,
    entity: str | None = None,
    max_pages: int = 1000,
    entity_id: int | None = None,
) -> list[dict]:
    """Every event of ``types`` with ``created_from <= created_at <= created_to``, sorted by (created_at, id).

    The whole window of ``iter_event_pages``, de-duplicated and sorted.
    """
    found = [
        event
        for page in iter_event_pages(
            client,
            types=types,
            created_from=created_from,
            created_to=created_to,
            entity=entity,
            max_pages=max_pages,
            entity_id=entity_id,
        )
        for event in page
    ]
    return sorted(found, key=event_sort_key)


def iter_event_pages(
    client,
    *,
    types: Sequence[str],
    created_from: int,
    created_to: int,
    entity: str | None = None,
    max_pages: int = 1000,
    entity_id: int | None = None,
) -> Iterator[list[dict]]:
    """The window page by page: each page's events not seen on an earlier page, in the order served.

    Sends ``filter[type]`` comma-joined (as amoCRM's official PHP SDK does), ``filter[created_at][from]``
    and ``[to]`` — the same ``to`` on every page, so events written meanwhile cannot shift the pages —
    and ``limit=100``. Pages are followed while amoCRM gives a ``next`` link; a 204 or an empty page
    ends the walk. Whether amoCRM's bounds are inclusive is undocumented: events outside the window are
    dropped here, so callers should overlap consecutive windows and rely on the id de-duplication.
    Raises ``AmoApiError`` rather than end a window early when ``max_pages`` is reached. A caller
    that acts page by page (reconciliation) can start on the first events while the rest is read.
    ``entity_id``: one entity's events only (``rules explain``).
    """
    if isinstance(types, str):
        types = [types]
    types = [t for t in types if t]
    if not types:
        raise ValueError("fetch_events needs at least one event type")
    created_from, created_to = int(created_from), int(created_to)
    if created_from > created_to:
        raise ValueError(f"created_from ({created_from}) is after created_to ({created_to})")
    if max_pages < 1:
        raise ValueError("max_pages must be at least 1")

    params: dict[str, object] = {
        "filter[type]": ",".join(types),
        "filter[created_at][from]": created_from,
        "filter[created_at][to]": created_to,
    }
    if entity:
        params["filter[entity]"] = entity
    if entity_id is not None:
        if not entity:  # amoCRM refuses filter[entity_id] without exactly one entity (crm_platform/events-and-notes)
            raise ValueError("filter by entity_id needs the entity")
        params["filter[entity_id][]"] = [int(entity_id)]

    seen: set[str] = set()
    page_no, pages_read = 1, 0
    seen_pages: set[int] = set()
    while True:
        if pages_read >= max_pages:
            raise AmoApiError(
                f"amoCRM's events log has more than {max_pages} pages of {EVENT_PAGE_LIMIT} between "
                f"{created_from} and {created_to}; stopped rather than skip the rest — use a shorter window"
            )
        seen_pages.add(page_no)
        page = client.get(EVENTS_PATH, {**params, "limit": EVENT_PAGE_LIMIT, "page": page_no})
        pages_read += 1
        items = _page_events(page, page_no)
        fresh: list[dict] = []
        for event in items:
            if not isinstance(event, dict) or event.get("id") in (None, ""):
                log.warning("skipped an event without an id in amoCRM's events log: %.200r", event)
                continue
            try:
                created_at = int(event.get("created_at"))  # type: ignore[arg-type]  # None: TypeError, caught
            except (TypeError, ValueError):
                log.warning("skipped event %s without a valid created_at", str(event["id"])[:40])
                continue
            if created_from <= created_at <= created_to and str(event["id"]) not in seen:
                seen.add(str(event["id"]))
                fresh.append(event)
        if fresh:
            yield fresh
        if not items:
            break
        next_page = _next_page(page, page_no)
        if next_page is None:
            break
        if next_page in seen_pages:
            raise MalformedAnswer(
                f"amoCRM's paging for {EVENTS_PATH} points back to page {next_page}, already read; stopped "
                "(a paging loop in amoCRM's answer; the next pass reads the window again)"
            )
        page_no = next_page


def _malformed(page_no: int, what: str) -> MalformedAnswer:
    return MalformedAnswer(
        f"amoCRM answered page {page_no} of {EVENTS_PATH} with {what}, not the documented HAL page; "
        "nothing of the window was queued past it — the next pass reads it again"
    )


def _kind(value: object) -> str:
    """A JSON value's kind, for a message (never the value: it may be large or hostile)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _page_events(page: object, page_no: int) -> list:
    """The page's ``_embedded.events``; a page that is not shaped as documented is amoCRM's fault."""
    if page is None:  # 204 or an empty body: no (more) events
        return []
    if not isinstance(page, dict):
        raise _malformed(page_no, f"{_kind(page)} instead of an object")
    embedded = page.get("_embedded")
    if embedded is None:
        return []
    if not isinstance(embedded, dict):
        raise _malformed(page_no, f"`_embedded` as {_kind(embedded)}")
    events = embedded.get("events")
    if events is None:
        return []
    if not isinstance(events, list):
        raise _malformed(page_no, f"`_embedded.events` as {_kind(events)}")
    return events


def _next_page(page: dict, current: int) -> int | None:
    """The page number the HAL ``next`` link names (the one after ``current`` if it names none);
    None when there is no next link.

    Only the page number is taken from the link: the filters (and the fixed upper bound) are always
    our own, whatever amoCRM chose to repeat in the link.
    """
    links = page.get("_links")
    if links is None:
        return None
    if not isinstance(links, dict):
        raise _malformed(current, f"`_links` as {_kind(links)}")
    link = links.get("next")
    if link is None:
        return None
    if not isinstance(link, dict):
        raise _malformed(current, f"a `next` link that is {_kind(link)}, not an object")
    href = link.get("href")
    if href is None or href == "":
        return None
    if not isinstance(href, str):
        raise _malformed(current, f"a `next` href that is {_kind(href)}, not a URL")
    values = parse_qs(urlsplit(href).query).get("page") or [""]
    try:
        number = int(values[0])
    except (TypeError, ValueError):
        return current + 1
    if number < 1:
        raise _malformed(current, f"a `next` link to page {number}")
    return number
