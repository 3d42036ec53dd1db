"""Reconciliation: turn what amoCRM's events log knows into queued events amohook has not seen.

A webhook amoCRM gave up on (about 20 minutes of no answer, about 95 of 5xx; a Digital Pipeline
hook is sent once) is lost for good, but the change stays in the events log
(``GET /api/v4/events``, amoCRM docs: crm_platform/events-and-notes). A pass reads the log since a
stored cursor, skips what amohook already knows (``amohook.recovery.identity``), and queues the rest as
events of the same entity and action as their webhook, marked ``source = "events_log"``. The
worker and the rules then treat them like webhooks, and the change registry makes one effect of
a change seen both ways.

A pass reads a closed window ``[from, to]`` with a fixed upper bound (the log has no documented
order and grows while it is read), starting ``OVERLAP`` seconds before the cursor: the log's
bounds' inclusivity and its delay are not documented, and a re-read event costs a lookup, not an
effect. The cursor moves only after everything the pass queued is committed. Passes for one
account never overlap, across processes (a lease).

A store's first look starts when the account was connected to *this* store (``init-auth`` stored
it): a fresh, moved or wiped store creates nothing for changes from before it existed, and the
overlap never reaches back past that point either. ``--since`` is the explicit catch-up; even then
an action whose change came only from the log is looked up in amoCRM before it is sent
(``amohook.actions``), so a task another store made for it is recognised, not made again.

Both ends of the window are amoCRM's time: the upper bound and the cursor never pass amoCRM's
clock (its ``Date`` header), so a host clock running fast cannot make a pass read amoCRM's future
and skip what happens meanwhile; an empty or inverted window is "nothing yet".
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from amohook.errors import first_line
from amohook.recovery.identity import Sighting, connected_at, describe, is_known
from amohook.rules import lead_changes
from amohook.rules.changes import webhook_custom_fields
from amohook.runtime.loop import Periodic
from amohook.store import lease as leases
from amohook.store.models import Account, Delivery, Event, ReconcileState
from amohook.times import human_time, iso_time

if TYPE_CHECKING:
    from amohook.store import Store

log = logging.getLogger("amohook.reconcile")

# The log's event types for the changes rules act on, and the webhook action each one stands for.
EVENT_ACTIONS = {
    "lead_added": "add",
    "lead_status_changed": "status",
    "entity_responsible_changed": "responsible",
}
OVERLAP = 600  # seconds re-read before the cursor on every pass
DEFAULT_SINCE = 3600  # kept for callers of the old API; the first look now starts at the connection
MAX_ID = 2**63 - 1  # the largest id the store's BIGINT columns hold (SQLite, MariaDB, PostgreSQL)
DEFAULT_MAX_LOOKBACK = 7 * 86400
PASS_LEASE_TTL = 900.0  # a dead holder blocks passes for this long at most
CHUNK = 250  # queued events committed per transaction
LEAD_BATCH = 250  # leads per read (amoCRM's page maximum): entries are recovered in groups this size
SOURCE = "events_log"
ENTRY_MAX = 64 * 1024  # bytes of an events-log entry kept in its delivery (amoCRM's are < 2 KB)
ENTRY_KEYS = ("id", "type", "entity_id", "entity_type", "created_at", "created_by", "account_id")
VALUE_MAX = 64  # characters of an id or time taken from an entry (amoCRM's ids: 26 at most)
NOTES_MAX = 20  # notes kept in a pass's summary; the rest are counted


@dataclass
class PassResult:
    """What one pass over one account did; ``as_dict`` is the JSON the CLI prints."""

    account: str
    window_from: int | None = None
    window_to: int | None = None
    read: int = 0
    known: int = 0
    queued: int = 0
    skipped: int = 0  # entries that cannot be stored (an id too long, negative, not a number): noted
    left_out_from: int | None = None  # the part of an outage older than --max-lookback
    left_out_to: int | None = None
    busy: bool = False  # another process was running a pass for this account
    error: str | None = None
    subscription: str | None = None  # the watchdog's finding, when it looked
    subscription_note: str | None = None
    requests: int = 0
    clock_skew: float | None = None  # this host's clock minus amoCRM's, by the Date headers of this pass
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """Times as ISO 8601 (UTC), as in every `--json` of amohook."""
        data = asdict(self)
        for name in ("window_from", "window_to", "left_out_from", "left_out_to"):
            data[name] = iso_time(data[name])
        return data


def synthetic_sha(account: str, event_id: str) -> str:
    """The queue's duplicate key for one log entry: re-reading it never queues it twice."""
    return hashlib.sha256(f"amohook:{SOURCE}:{account}:{event_id}".encode()).hexdigest()


def _block(values: Any, key: str) -> dict:
    """``value_after[0][key]`` (or before): the log's documented value shape, checked."""
    if isinstance(values, list):
        for item in values:
            if isinstance(item, dict) and isinstance(item.get(key), dict):
                return item[key]
    return {}


def _s(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def webhook_item(event: dict, lead: dict | None) -> tuple[str, dict] | None:
    """The webhook action and item (API v2 shape: every value a string) one log entry stands for.

    What changed comes from the entry itself (its before and after); the lead's current state
    fills in what a webhook would carry besides (name, price, responsible, custom fields), so the
    rules need no lead read of their own.
    """
    action = EVENT_ACTIONS.get(str(event.get("type")))
    lead_id = _s(event.get("entity_id"))
    if action is None or lead_id is None or event.get("entity_type") not in ("lead", "leads"):
        return None
    lead = lead or {}
    item: dict[str, Any] = {
        "id": lead_id,
        "last_modified": _s(int(event["created_at"])),  # iter_event_pages checked it is a number
        "modified_user_id": _s(event.get("created_by")),
        "name": _s(lead.get("name")),
        "price": _s(lead.get("price")),
        "responsible_user_id": _s(lead.get("responsible_user_id")),
        "status_id": _s(lead.get("status_id")),
        "pipeline_id": _s(lead.get("pipeline_id")),
        "date_create": _s(lead.get("created_at")),
        "created_user_id": _s(lead.get("created_by")),
        "account_id": _s(event.get("account_id")),
        "events_log_id": _s(event.get("id")),
    }
    if action == "status":
        after = _block(event.get("value_after"), "lead_status")
        before = _block(event.get("value_before"), "lead_status")
        item.update(
            status_id=_s(after.get("id")),
            pipeline_id=_s(after.get("pipeline_id")),
            old_status_id=_s(before.get("id")),
            old_pipeline_id=_s(before.get("pipeline_id")),
        )
        if item["status_id"] is None:
            return None
    elif action == "responsible":
        after = _block(event.get("value_after"), "responsible_user")
        before = _block(event.get("value_before"), "responsible_user")
        item.update(responsible_user_id=_s(after.get("id")), old_responsible_user_id=_s(before.get("id")))
        if item["responsible_user_id"] is None:
            return None
    if fields := webhook_custom_fields(lead):
        item["custom_fields"] = fields
    return action, {k: v for k, v in item.items() if v is not None}


def _id_problem(value: Any, *, zero: bool = False) -> str | None:
    """Why ``value`` is no id the store can hold (None: it is one): an integer, or a string of
    ASCII digits, from 1 (0 with ``zero``) to 2^63 - 1."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return "is not a whole number"
    text = str(value)
    if not text.isascii() or not text.isdigit():
        return "is negative" if text.startswith("-") else "is not a whole number"
    if len(text) > 19 or int(text) > MAX_ID:
        return f"has {len(text)} digits (more than the store's 64-bit ids hold)"
    if int(text) == 0 and not zero:
        return "is 0"
    return None


def unstorable(event: dict) -> str | None:
    """What in a log entry of a type reconciliation acts on the store could not hold, or None.

    Checked before anything is looked up or written: one such entry is skipped and noted, and
    never fails the pass or the chunk it came in (amoCRM documents ids as integers; an entry that
    breaks that is not a change amohook can act on).
    """
    problem = _id_problem(event.get("entity_id"))
    if problem:
        return f"entity_id {problem}"
    if event.get("account_id") is not None and (problem := _id_problem(event.get("account_id"))):
        return f"account_id {problem}"
    for side in ("value_after", "value_before"):
        for key, fields in (("lead_status", ("id", "pipeline_id")), ("responsible_user", ("id",))):
            block = _block(event.get(side), key)
            for name in fields:
                if block.get(name) is not None and (problem := _id_problem(block.get(name), zero=True)):
                    return f"{side}'s {key}.{name} {problem}"
    return None


def _skip(result: PassResult, event: dict, why: str) -> None:
    result.skipped += 1
    result.notes.append(f"skipped events-log entry {str(event.get('id'))[:40]!r}: {why[:200]}")


def _sightings(account: str, action: str, item: dict) -> list[Sighting]:
    out = []
    for change in lead_changes("leads", action, item):
        target, origin = describe(change)
        out.append(Sighting(account, change.lead_id, change.kind, target, origin, int(item["last_modified"]), SOURCE))
    return out


def _already_queued(account: str, events: list[dict]) -> set[str]:
    shas = {synthetic_sha(account, str(e.get("id"))): str(e.get("id")) for e in events}
    found: set[str] = set()
    keys = list(shas)
    for i in range(0, len(keys), 200):
        for row in Delivery.select(Delivery.body_sha256).where(Delivery.body_sha256.in_(keys[i : i + 200])):
            found.add(shas[row.body_sha256])
    return found


def _unknown(account: str, events: list[dict], result: PassResult) -> list[dict]:
    """The entries of one page that amohook has neither queued nor seen; the rest count as known."""
    from amohook.amocrm.events import event_sort_key

    queued_before = _already_queued(account, events)
    todo = []
    for event in sorted(events, key=event_sort_key):
        if str(event.get("id")) in queued_before:
            result.known += 1
            continue
        if EVENT_ACTIONS.get(str(event.get("type"))) is not None and (why := unstorable(event)):
            _skip(result, event, why)
            continue
        try:
            shaped = webhook_item(event, None)
            if shaped is None:
                result.known += 1  # not a change the rules act on (another entity, no new stage)
                continue
            if any(len(value) > VALUE_MAX for value in shaped[1].values() if isinstance(value, str)):
                raise ValueError("an id or time far longer than amoCRM's")  # never stored verbatim
            sightings = _sightings(account, *shaped)
        except (TypeError, ValueError):  # an entry of a shape amoCRM does not document: pass it over
            result.known += 1
            result.notes.append(
                f"passed over an events-log entry of an unexpected shape (id {str(event.get('id'))[:40]})"
            )
            continue
        if sightings and all(is_known(s) for s in sightings):
            result.known += 1
            continue
        todo.append(event)
    return todo


def _recover(
    store: Store, client, account: str, events: list[dict], result: PassResult, clock: Callable[[], float]
) -> int:
    """Read the entries' leads in one request and queue the entries; returns how many were queued."""
    from amohook.amocrm.leads import fetch_leads

    leads = fetch_leads(client, {int(e["entity_id"]) for e in events})
    entries = []
    for event in events:
        shaped = webhook_item(event, leads.get(int(event["entity_id"])))
        if shaped is not None:
            entries.append((event, shaped[0], shaped[1]))
    skipped_before = result.skipped
    queued = _queue(store, account, entries, clock(), result)
    result.known += len(events) - queued - (result.skipped - skipped_before)
    return queued


def stored_entry(event: dict) -> str:
    """The log entry as its delivery keeps it (for `events show`), at most ``ENTRY_MAX`` bytes.

    What the rules use is already in the event's item; an entry larger than any amoCRM documents
    (a 50 MB ``value_after``) keeps its scalar fields, each cut short, and says what was left out.
    """
    text = json.dumps(event, ensure_ascii=False, sort_keys=True)
    if len(text) <= ENTRY_MAX:  # characters: at most 4 bytes each, so checked again in bytes below
        if len(text.encode("utf-8")) <= ENTRY_MAX:
            return text
    kept = {key: str(event.get(key))[:80] for key in ENTRY_KEYS if event.get(key) is not None}
    kept["amohook_note"] = f"entry of {len(text.encode('utf-8'))} bytes cut to its scalar fields"
    return json.dumps(kept, ensure_ascii=False, sort_keys=True)


# What a database refuses for one row's values (too long, out of range), as opposed to the
# database being unreachable: only these make a chunk fall back to row by row.
def _row_refused() -> tuple[type[BaseException], ...]:
    import peewee

    return (peewee.DataError, peewee.IntegrityError, OverflowError)


def _queue(
    store: Store, account: str, entries: list[tuple[dict, str, dict]], now: float, result: PassResult | None = None
) -> int:
    """Store each log entry as a delivery of its own with one event, through the inbox's one writer
    (``inbox.store_deliveries``); an entry stored before adds nothing.

    A chunk is one transaction; should the database refuse one row's values anyway, the chunk is
    written again row by row and only that row is skipped (and noted).
    """
    from amohook.inbox import store_deliveries

    queued = 0
    refused = _row_refused()
    for i in range(0, len(entries), CHUNK):
        chunk = entries[i : i + CHUNK]
        items = [_incoming(account, entry, now) for entry in chunk]
        outcomes: list[bool | None] = []
        try:
            outcomes = [stored.new for stored in store_deliveries(store, items)]
        except refused:
            outcomes = []
            for entry, one in zip(chunk, items, strict=True):
                try:
                    outcomes += [stored.new for stored in store_deliveries(store, [one])]
                except refused as exc:
                    outcomes.append(None)
                    if result is not None:
                        _skip(result, entry[0], f"the database refused it ({type(exc).__name__}: {str(exc)[:120]})")
        queued += sum(1 for o in outcomes if o)
    return queued


def _incoming(account: str, entry: tuple[dict, str, dict], now: float):
    """One log entry as the inbox stores it: a delivery of its own (the entry, its synthetic
    duplicate key) with one event shaped as its webhook would be, marked ``source = events_log``."""
    from amohook.inbox import Incoming
    from amohook.webhooks.parse import ParsedWebhook, WebhookEvent

    event, action, item = entry
    shaped = WebhookEvent(entity="leads", action=action, entity_id=item["id"], index=0, block="leads", data=item)
    return Incoming(
        body=stored_entry(event).encode("utf-8"),
        parsed=ParsedWebhook(account, item.get("account_id"), [shaped], {}),
        content_type="application/json",
        headers={"x-amohook-source": SOURCE},
        received_at=now,
        key=synthetic_sha(account, str(event.get("id"))),
        source=SOURCE,
    )


@dataclass
class Window:
    """The part of the log one pass reads, in amoCRM's time: ``[start, end]``; empty when start > end."""

    start: int
    end: int
    first_look: int  # when the account was connected to this store: nothing before it is read unasked
    skew: float  # this host's clock minus amoCRM's, as far as known (0 when unknown)
    left_out: tuple[int, int] | None = None  # older than --max-lookback

    @property
    def empty(self) -> bool:
        return self.start > self.end


def known_skew(client, account: str) -> float | None:
    """This host's clock minus amoCRM's, as last seen: by this client, by the last pass (its
    summary keeps it), or at the last token answer; None when nothing ever told it."""
    if getattr(client, "clock_skew", None) is not None:
        return client.clock_skew
    state = ReconcileState.get_or_none(ReconcileState.account == account)
    try:
        last = json.loads(state.last_pass_summary).get("clock_skew") if state and state.last_pass_summary else None
    except (ValueError, AttributeError):
        last = None
    if isinstance(last, (int, float)) and not isinstance(last, bool):
        return float(last)
    row = Account.get_or_none(Account.subdomain == account)
    return row.clock_skew if row is not None else None


def _whole(skew: float | None) -> float:
    """A skew the ``Date`` header can tell (it has whole seconds): under a second counts as none."""
    return 0.0 if skew is None or abs(skew) < 1.0 else skew


def learn_clock(client, account: str) -> None:
    """Make sure amoCRM's clock is known before a window is planned: the window's end, and a
    store's first look (at the connection), are amoCRM's time. One request, and only while
    nothing has told the clock yet (no pass recorded it, no token answer carried it)."""
    if known_skew(client, account) is None:
        client.request("GET", "/api/v4/account")


def plan_window(
    client, account: str, *, since: float | None, max_lookback: float, local_now: float
) -> tuple[Window, list[str]]:
    """Where this pass reads: from the cursor (less the overlap), or from when the account was
    connected to this store; ``since`` reaches back further on purpose (the explicit catch-up).
    Never past amoCRM's clock, never before ``max_lookback``. Returns the window and its notes."""
    state = ReconcileState.get_or_none(ReconcileState.account == account)
    skew = _whole(known_skew(client, account))
    end = int(min(local_now, local_now - skew))  # amoCRM's now; never later than ours
    first = connected_at(account, skew)
    first_look = int(first) if first is not None else end
    cursor = state.cursor if state is not None else None
    if cursor is not None:
        # A cursor in amoCRM's future was set by a clock running fast: read from amoCRM's now.
        start = min(int(cursor), end) - OVERLAP
    else:
        start = first_look
    start = max(start, first_look)  # the overlap never reaches back before this store existed
    if since is not None:
        start = min(start, end - int(since))
    notes = []
    window = Window(start=start, end=end, first_look=first_look, skew=skew)
    floor = end - int(max_lookback)
    if start < floor:
        window.left_out = (start, floor)
        window.start = floor
        notes.append(
            f"changes between {human_time(start)} and {human_time(floor)} are older than --max-lookback "
            "and were not read"
        )
    return window, notes


def reconcile_account(
    store: Store,
    client,
    account: str,
    *,
    since: float | None = None,
    max_lookback: float = DEFAULT_MAX_LOOKBACK,
    watchdog: bool = True,
    clock: Callable[[], float] = time.time,
) -> PassResult:
    """One pass over ``account``'s events log, and (unless ``watchdog`` is False) a look at the
    subscriptions amohook made.

    ``since``: also read this many seconds back (the explicit catch-up); None: from the cursor, or
    on the first pass from when the account was connected to this store.
    """
    from amohook.amocrm.events import iter_event_pages

    result = PassResult(account=account)
    owner = leases.new_owner()
    name = f"reconcile:{account}"
    if not leases.try_acquire(name, owner, PASS_LEASE_TTL):  # the database's clock: hosts may disagree
        result.busy = True
        # Who and until when: a killed pass blocks passes until its lease runs out (PASS_LEASE_TTL).
        result.notes.append(f"{leases.describe_busy(name, 'running a pass for this account')}; skipped")
        return result
    requests_before = client.requests_made
    try:
        learn_clock(client, account)
        local = clock()
        window, notes = plan_window(client, account, since=since, max_lookback=max_lookback, local_now=local)
        result.notes += notes
        if window.left_out is not None:
            result.left_out_from, result.left_out_to = window.left_out
        result.window_from, result.window_to = window.start, window.end
        cursor: int | None = None
        if window.empty:
            # amoCRM's clock has not reached the window yet (the account was connected moments
            # ago, or an earlier pass ran on a clock ahead of amoCRM's): nothing to read yet.
            log.info("reconciliation of '%s': nothing to read yet (amoCRM's clock is before the window)", account)
        else:
            todo: list[dict] = []
            for page in iter_event_pages(
                client, types=list(EVENT_ACTIONS), created_from=window.start, created_to=window.end, entity="lead"
            ):
                result.read += len(page)
                leases.renew(name, owner, PASS_LEASE_TTL)  # a long backlog must not let a second pass start
                todo += _unknown(account, page, result)
                # Queue as soon as a lead read's worth is waiting: workers and the action sender start on
                # the first changes while the rest of the window is still being read.
                while len(todo) >= LEAD_BATCH:
                    result.queued += _recover(store, client, account, todo[:LEAD_BATCH], result, clock)
                    todo = todo[LEAD_BATCH:]
            if todo:
                result.queued += _recover(store, client, account, todo, result, clock)
            # What amoCRM's clock said when the window was read (its Date header, now known for sure):
            # the cursor never passes it, so whatever happened after the read is read next time.
            seen_skew = getattr(client, "clock_skew", None)
            cursor = window.end if seen_skew is None else min(window.end, int(local - _whole(seen_skew)))
        if watchdog:
            from amohook.recovery.watchdog import check_subscriptions

            try:
                result.subscription, result.subscription_note = check_subscriptions(store, client, account, clock=clock)
            except Exception as exc:  # the watchdog must never hold the cursor back: the log was read
                result.subscription_note = f"the subscription check failed: {first_line(exc, 300)}"
                log.warning("watchdog for '%s': %s", account, result.subscription_note)
        result.requests = client.requests_made - requests_before
        if getattr(client, "clock_skew", None) is not None:
            result.clock_skew = round(client.clock_skew, 1)
        _save(store, account, cursor=cursor, result=result, clock=clock, passed=True)
        return result
    except Exception as exc:
        result.error = first_line(exc, 300)
        result.requests = client.requests_made - requests_before
        try:
            _save(store, account, cursor=None, result=result, clock=clock)
        except Exception:  # the store is down too: the caller reports the first error
            pass
        raise
    finally:
        leases.release(name, owner)


class _Notes:
    """A logger for planning that keeps what the rules say instead of logging it (a preview)."""

    def __init__(self):
        self.lines: list[str] = []

    def warning(self, message: str, *args: Any) -> None:
        self.lines.append(message % args if args else message)

    info = debug = warning


def preview_account(
    store: Store,
    client,
    account: str,
    *,
    rules: list | None = None,
    since: float | None = None,
    max_lookback: float = DEFAULT_MAX_LOOKBACK,
    clock: Callable[[], float] = time.time,
) -> dict:
    """What a pass would do, writing nothing of amohook's (no event, change, action or cursor;
    amoCRM is only read): the window, every change it finds and whether amohook knows it, and
    for the new ones which rules would fire and what they would plan (`reconcile --dry-run`).

    ``rules``: compiled rules (``amohook.rules.load_and_compile``); None: changes only.
    """
    from types import SimpleNamespace

    from amohook.amocrm.events import iter_event_pages
    from amohook.amocrm.leads import fetch_leads
    from amohook.recovery.identity import peek
    from amohook.rules.handler import RulesHandler
    from amohook.store.models import Action

    learn_clock(client, account)
    window, notes = plan_window(client, account, since=since, max_lookback=max_lookback, local_now=clock())
    out: dict[str, Any] = {
        "account": account,
        "window_from": window.start,
        "window_to": window.end,
        "first_look": window.first_look,
        "read": 0,
        "known": 0,
        "new": 0,
        "skipped": 0,
        "changes": [],
        "known_changes": [],
        "notes": notes,
    }
    if window.empty:
        out["notes"].append("nothing to read yet: amoCRM's clock is before the window")
        return out
    scratch = PassResult(account=account)
    fresh: list[dict] = []
    for page in iter_event_pages(
        client, types=list(EVENT_ACTIONS), created_from=window.start, created_to=window.end, entity="lead"
    ):
        out["read"] += len(page)
        new = _unknown(account, page, scratch)
        new_ids = {str(e.get("id")) for e in new}
        out.setdefault("known_changes", []).extend(
            {
                "event_id": str(e.get("id"))[:40],
                "lead_id": str(e.get("entity_id"))[:40],
                "type": str(e.get("type"))[:40],
            }
            for e in page
            if str(e.get("id")) not in new_ids
        )
        fresh += new
    out["known"], out["skipped"], out["new"] = scratch.known, scratch.skipped, len(fresh)
    out["notes"] += scratch.notes
    handler = RulesHandler([r for r in rules or [] if r.account == account], store) if rules else None
    lines = _Notes()
    ctx = SimpleNamespace(client=lambda sub=None: client, logger=lines)
    for start in range(0, len(fresh), LEAD_BATCH):
        batch = fresh[start : start + LEAD_BATCH]
        leads = fetch_leads(client, {int(e["entity_id"]) for e in batch})
        for entry in batch:
            shaped = webhook_item(entry, leads.get(int(entry["entity_id"])))
            if shaped is None:
                continue
            action, item = shaped
            change: dict[str, Any] = {
                "event_id": str(entry.get("id")),
                "lead_id": int(entry["entity_id"]),
                "type": str(entry.get("type")),
                "at": int(entry["created_at"]),
                "actions": [],
            }
            if handler is not None:
                event = SimpleNamespace(
                    id=None,
                    delivery_id=0,
                    entity="leads",
                    action=action,
                    entity_id=item["id"],
                    account=account,
                    account_id=item.get("account_id"),
                    data=item,
                    received_at=clock(),
                    attempts=0,
                    source=SOURCE,
                )
                planned = handler.guard(handler.plan(event, ctx, peek), ctx)
                recorded = {
                    a.key for a in Action.select(Action.key).where(Action.key.in_([p.key for p in planned] or [""]))
                }
                change["actions"] = [
                    {
                        "rule": p.rule,
                        "kind": p.kind,
                        "lead_id": p.lead_id,
                        "already_recorded": p.key in recorded,
                        "skip_reason": p.skip_reason,
                        "payload": {k: v for k, v in p.payload.items() if k not in ("request_id", "url_env")},
                    }
                    for p in planned
                ]
            out["changes"].append(change)
    out["notes"] += lines.lines
    return out


def _save(
    store: Store,
    account: str,
    *,
    cursor: int | None,
    result: PassResult,
    clock: Callable[[], float],
    passed: bool = False,
) -> None:
    """Move the cursor (only after the pass's events are committed) and keep its summary;
    ``passed``: the pass completed (with nothing to read yet, the cursor stays where it was)."""
    figures = result.as_dict()
    if len(result.notes) > NOTES_MAX:  # a window of odd entries must not make a row of megabytes
        figures["notes"] = result.notes[:NOTES_MAX] + [f"and {len(result.notes) - NOTES_MAX} more note(s)"]
    summary = json.dumps(figures, ensure_ascii=False)
    with store.write():
        ReconcileState.insert(account=account).on_conflict_ignore().execute()
        fields: dict[str, Any] = {"last_pass_summary": summary, "last_error": result.error}
        if passed:
            fields.update(last_pass_at=clock())
        if cursor is not None:
            fields.update(cursor=cursor)
        ReconcileState.update(**fields).where(ReconcileState.account == account).execute()


def reconcilable_accounts(subdomain: str | None = None) -> list[str]:
    """Accounts with a token, in a stable order (``subdomain`` picks one)."""
    query = Account.select(Account.subdomain).where(Account.access_token.is_null(False))
    if subdomain:
        query = query.where(Account.subdomain == subdomain)
    return [a.subdomain for a in query.order_by(Account.subdomain)]


@dataclass(frozen=True)
class AccountReconcileStatus:
    account: str
    last_pass_at: float | None
    cursor: int | None
    lag: float | None  # seconds between now and the cursor
    recovered_24h: int
    subscription: str
    subscription_note: str | None
    last_error: str | None


def reconcile_status(account: str, now: float) -> AccountReconcileStatus:
    """What `status` and /healthz show about reconciliation for one account."""
    from amohook.recovery.identity import recovered_since

    row = ReconcileState.get_or_none(ReconcileState.account == account)
    cursor = row.cursor if row else None
    return AccountReconcileStatus(
        account=account,
        last_pass_at=row.last_pass_at if row else None,
        cursor=cursor,
        lag=None if cursor is None else max(0.0, now - cursor),
        recovered_24h=recovered_since(account, now - 86400),
        subscription=(row.subscription_state if row else None) or "unknown",
        subscription_note=row.subscription_note if row else None,
        last_error=row.last_error if row else None,
    )


class Reconciler:
    """The background passes of `serve` and `worker`: every account, every ``interval`` seconds.

    A failing account is logged and tried again at the next interval; a revoked grant or a
    blocked account is said once until it changes (a person has to act). Passes of several
    processes on one database never overlap (the pass lease); the loser simply skips.
    """

    def __init__(
        self,
        store: Store,
        interval: float,
        *,
        client_factory: Callable | None = None,
        since: float | None = None,
        max_lookback: float = DEFAULT_MAX_LOOKBACK,
        on_queued: Callable[[int], None] | None = None,
        listening: bool = False,
        after_pass: Callable[[str, Any], object] | None = None,
    ):
        """``listening``: this process runs the webhook listener (`serve`), so webhooks are expected.
        ``after_pass(account, client)`` runs after each account's pass (the stale check of
        lead.stale rules: the change registry has just caught up with the log)."""
        self.store = store
        self.listening = listening
        self.after_pass = after_pass
        self.interval = interval
        self.since = since
        self.max_lookback = max_lookback
        self.on_queued = on_queued
        self._client_factory = client_factory
        self._clients: dict[str, Any] = {}
        self._said: dict[str, str] = {}
        self.last: dict[str, PassResult] = {}

    def client(self, account: str):
        if account not in self._clients:
            if self._client_factory is not None:
                self._clients[account] = self._client_factory(self.store, account)
            else:
                from amohook.amocrm.client import client_for

                self._clients[account] = client_for(self.store, account, max_attempts=3)
        return self._clients[account]

    def run_once(self) -> list[PassResult]:
        results = []
        for account in reconcilable_accounts():
            try:
                result = reconcile_account(
                    self.store, self.client(account), account, since=self.since, max_lookback=self.max_lookback
                )
            except Exception as exc:
                message = first_line(exc, 300)
                if self._said.get(account) != message:
                    log.warning("reconciliation of '%s' failed: %s", account, message)
                    self._said[account] = message
                continue
            self._said.pop(account, None)
            self.last[account] = result
            results.append(result)
            if result.queued:
                # Worker-only mode reads every change from the log: routine. Where a webhook was
                # expected and did not come, a person should look at the subscription.
                expected = self.webhooks_expected(account, since=result.window_from)
                log.log(
                    logging.WARNING if expected else logging.INFO,
                    "reconciliation of '%s': %d change(s) found in amoCRM's events log that no webhook "
                    "brought; queued%s",
                    account,
                    result.queued,
                    " — webhooks are expected for this account: look at `amohook webhooks list`" if expected else "",
                )
                if self.on_queued:
                    self.on_queued(result.queued)
            for note in result.notes:
                if not result.busy:
                    log.warning("reconciliation of '%s': %s", account, note)
            if self.after_pass is not None:
                self.after_pass(account, self.client(account))
        return results

    def webhooks_expected(self, account: str, since: float | None = None) -> bool:
        """Should webhooks have brought this account's changes? Yes when this process listens for
        them (`serve`), when amohook subscribed a destination for the account (`webhooks
        subscribe`), or when webhooks for it are arriving: one was stored since ``since`` (the
        window the changes were found in), so these would have come too. Worker-only mode has none
        of these, nor has a worker on a store that once ran `serve` (a moved quick-start store):
        there the log is the only way changes come, and reading it is routine."""
        if self.listening:
            return True
        from amohook.store.models import Subscription

        if Subscription.select(Subscription.id).where(Subscription.account == account).exists():
            return True
        if since is None:
            return False
        return (
            Event.select(Event.id)
            .where((Event.account == account) & Event.source.is_null() & (Event.received_at >= since))
            .exists()
        )

    def loop(self) -> Periodic:
        """The background passes of `serve` and `worker`: one at start, then every ``interval``."""
        return Periodic("reconcile", lambda stop: self.run_once(), self.interval, store=self.store, logger=log)
