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
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from amohook.recovery.identity import Sighting, describe, is_known
from amohook.rules import lead_changes
from amohook.store import lease as leases
from amohook.store.models import Account, Delivery, Event, ReconcileState

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
DEFAULT_SINCE = 3600  # the first pass's look-back
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
    left_out_from: int | None = None  # the part of an outage older than --max-lookback
    left_out_to: int | None = None
    busy: bool = False  # another process was running a pass for this account
    error: str | None = None
    subscription: str | None = None  # the watchdog's finding, when it looked
    subscription_note: str | None = None
    requests: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


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
    fields = []
    for cf in lead.get("custom_fields_values") or []:
        if isinstance(cf, dict):
            values = [{"value": _s(v.get("value"))} for v in cf.get("values") or [] if isinstance(v, dict)]
            fields.append({"id": _s(cf.get("field_id")), "name": _s(cf.get("field_name")), "values": values})
    if fields:
        item["custom_fields"] = fields
    return action, {k: v for k, v in item.items() if v is not None}


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
        try:
            shaped = webhook_item(event, None)
            if shaped is None or not str(event.get("entity_id")).isdecimal():
                result.known += 1  # not a change the rules act on (another entity, or not a lead id)
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
    queued = _queue(store, account, entries, clock())
    result.known += len(events) - queued
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


def _queue(store: Store, account: str, entries: list[tuple[dict, str, dict]], now: float) -> int:
    """Store each log entry as a delivery of its own with one event; duplicates are skipped."""
    queued = 0
    for i in range(0, len(entries), CHUNK):
        with store.write():
            for event, action, item in entries[i : i + CHUNK]:
                sha = synthetic_sha(account, str(event.get("id")))
                if Delivery.select(Delivery.id).where(Delivery.body_sha256 == sha).exists():
                    continue
                delivery = Delivery.create(
                    body_sha256=sha,
                    body=stored_entry(event),
                    content_type="application/json",
                    headers=json.dumps({"x-amohook-source": SOURCE}),
                    remote_addr=None,
                    received_at=now,
                )
                Event.create(
                    delivery_id=delivery.id,
                    idx=0,
                    entity="leads",
                    action=action,
                    entity_id=item["id"],
                    account=account,
                    account_id=item.get("account_id"),
                    data=json.dumps(item, ensure_ascii=False, separators=(",", ":")),
                    status="pending",
                    received_at=now,
                    updated_at=now,
                    next_attempt_at=0,
                    source=SOURCE,
                )
                queued += 1
    return queued


def reconcile_account(
    store: Store,
    client,
    account: str,
    *,
    since: float = DEFAULT_SINCE,
    max_lookback: float = DEFAULT_MAX_LOOKBACK,
    watchdog: bool = True,
    clock: Callable[[], float] = time.time,
) -> PassResult:
    """One pass over ``account``'s events log, and (unless ``watchdog`` is False) a look at the
    subscriptions amohook made."""
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
        state = ReconcileState.get_or_none(ReconcileState.account == account)
        now = int(clock())
        start = (state.cursor - OVERLAP) if state is not None and state.cursor is not None else now - int(since)
        floor = now - int(max_lookback)
        if start < floor:
            result.left_out_from, result.left_out_to = start + (OVERLAP if state and state.cursor else 0), floor
            start = floor
            result.notes.append(
                f"changes between {_iso(result.left_out_from)} and {_iso(floor)} are older than --max-lookback "
                "and were not read"
            )
        result.window_from, result.window_to = start, now
        todo: list[dict] = []
        for page in iter_event_pages(
            client, types=list(EVENT_ACTIONS), created_from=start, created_to=now, entity="lead"
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
        if watchdog:
            from amohook.recovery.watchdog import check_subscriptions

            try:
                result.subscription, result.subscription_note = check_subscriptions(store, client, account, clock=clock)
            except Exception as exc:  # the watchdog must never hold the cursor back: the log was read
                result.subscription_note = f"the subscription check failed: {_one_line(exc)}"
                log.warning("watchdog for '%s': %s", account, result.subscription_note)
        result.requests = client.requests_made - requests_before
        _save(store, account, cursor=now, result=result, clock=clock)
        return result
    except Exception as exc:
        result.error = _one_line(exc)
        result.requests = client.requests_made - requests_before
        try:
            _save(store, account, cursor=None, result=result, clock=clock)
        except Exception:  # the store is down too: the caller reports the first error
            pass
        raise
    finally:
        leases.release(name, owner)


def _save(store: Store, account: str, *, cursor: int | None, result: PassResult, clock: Callable[[], float]) -> None:
    """Move the cursor (only after the pass's events are committed) and keep its summary (its notes
    bounded: a window of odd entries must not make a row of megabytes)."""
    figures = result.as_dict()
    if len(result.notes) > NOTES_MAX:
        figures["notes"] = result.notes[:NOTES_MAX] + [f"and {len(result.notes) - NOTES_MAX} more note(s)"]
    summary = json.dumps(figures, ensure_ascii=False)
    with store.write():
        ReconcileState.insert(account=account).on_conflict_ignore().execute()
        fields: dict[str, Any] = {"last_pass_summary": summary, "last_error": result.error}
        if cursor is not None:
            fields.update(cursor=cursor, last_pass_at=clock())
        ReconcileState.update(**fields).where(ReconcileState.account == account).execute()


def _one_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


def _iso(ts: float | None) -> str:
    return "—" if ts is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


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
        since: float = DEFAULT_SINCE,
        max_lookback: float = DEFAULT_MAX_LOOKBACK,
        on_queued: Callable[[int], None] | None = None,
        after_pass: Callable[[str, Any], object] | None = None,
    ):
        """``after_pass(account, client)`` runs after each account's pass (the stale check of
        lead.stale rules: the change registry has just caught up with the log)."""
        self.store = store
        self.after_pass = after_pass
        self.interval = interval
        self.since = since
        self.max_lookback = max_lookback
        self.on_queued = on_queued
        self._client_factory = client_factory
        self._clients: dict[str, Any] = {}
        self._said: dict[str, str] = {}
        self.last: dict[str, PassResult] = {}
        self._thread: threading.Thread | None = None

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
                message = _one_line(exc)
                if self._said.get(account) != message:
                    log.warning("reconciliation of '%s' failed: %s", account, message)
                    self._said[account] = message
                continue
            self._said.pop(account, None)
            self.last[account] = result
            results.append(result)
            if result.queued:
                log.warning(
                    "reconciliation of '%s': %d change(s) found in amoCRM's events log that no webhook brought; queued",
                    account,
                    result.queued,
                )
                if self.on_queued:
                    self.on_queued(result.queued)
            for note in result.notes:
                if not result.busy:
                    log.warning("reconciliation of '%s': %s", account, note)
            if self.after_pass is not None:
                self.after_pass(account, self.client(account))
        return results

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except Exception as exc:  # the store is down: try again next interval
                log.warning("reconciliation pass failed: %s", _one_line(exc))
            finally:
                self.store.close_quietly()
            stop.wait(self.interval)

    def start(self, stop: threading.Event) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, args=(stop,), name="amohook-reconcile", daemon=True)
        self._thread.start()
        return self._thread
