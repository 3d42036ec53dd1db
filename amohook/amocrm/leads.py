"""Reading many leads by id in few requests (``GET /api/v4/leads?filter[id][]=…``).

Reconciliation learns lead ids from the events log and needs the leads' current state; one request
per lead would spend the shared 7 requests/s, a filtered list reads 250 per request.
"""

from __future__ import annotations

from collections.abc import Iterable

from amohook.amocrm.client import PAGE_LIMIT
from amohook.errors import AmoApiError, MalformedAnswer

LEADS_PATH = "/api/v4/leads"
# One batch of ids fills one page: 250 is the leads list's maximum `limit`
# (https://www.amocrm.ru/developers/content/crm_platform/leads-api). 250 nine-digit ids make a URL of
# about 7,800 bytes, near the 8 KB request line nginx accepts by default: a 414 halves the batch.
LEAD_BATCH = PAGE_LIMIT


def fetch_leads(client, ids: Iterable[int], *, batch: int = LEAD_BATCH) -> dict[int, dict]:
    """The leads with these ids, by id; a lead amoCRM does not return (deleted, no right) is absent.

    Ids are de-duplicated and sent in batches of ``batch`` as ``filter[id][]`` with ``limit=250``;
    a batch's paging is followed should amoCRM split it anyway, and a batch whose URL is refused as
    too long (414) is sent again as two halves. No ``with=`` is sent.
    """
    wanted: list[int] = []
    seen: set[int] = set()
    for raw in ids:
        if isinstance(raw, bool):
            raise ValueError(f"not a lead id: {raw!r}")
        lead_id = int(raw)
        if lead_id not in seen:
            seen.add(lead_id)
            wanted.append(lead_id)
    if not 1 <= batch <= PAGE_LIMIT:
        raise ValueError(f"batch must be 1..{PAGE_LIMIT}")

    found: dict[int, dict] = {}
    chunks = [wanted[start : start + batch] for start in range(0, len(wanted), batch)]
    while chunks:
        chunk = chunks.pop(0)
        try:
            leads = list(client.iter_pages(LEADS_PATH, "leads", {"filter[id][]": chunk}, limit=PAGE_LIMIT))
        except AmoApiError as exc:
            if exc.status != 414:
                raise
            if len(chunk) == 1:
                raise MalformedAnswer(
                    f"amoCRM (or a proxy before it) refused GET {LEADS_PATH} for one lead id as too long (414); "
                    "a URL that short is not too long — amoCRM's fault, try again later"
                ) from None
            half = len(chunk) // 2
            chunks[:0] = [chunk[:half], chunk[half:]]
            continue
        for lead in leads:
            try:
                lead_id = int(lead["id"])
            except (KeyError, TypeError, ValueError):
                continue
            if lead_id in seen:  # never trust a filter blindly: only what was asked for
                found[lead_id] = lead
    return found
