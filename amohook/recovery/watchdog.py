"""The subscription watchdog: notice a webhook destination amoCRM switched off, and switch it on.

amoCRM switches a destination off after more than 100 failed deliveries in two hours (amoCRM
docs: crm_platform/webhooks-format) and only tells the account's admins in its notification
centre. How to switch one back on through the API is not documented: re-subscribing the same
destination "updates it with the passed settings" (crm_platform/webhooks-api); if it stays off,
the watchdog removes and adds it. Changes made while it was off reach amohook through
reconciliation. Only destinations amohook subscribed itself (``Subscription``) are watched.
Only an admin's token may read subscriptions: without one the watchdog says so once and
reconciliation goes on.

It looks on every reconciliation pass (one ``GET /api/v4/webhooks`` per account when all is well):
the pass interval (``--reconcile``, 5 minutes by default) is already how often amohook asks amoCRM
about an account, and a destination switched off loses every webhook until it is back on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from amohook.store.models import ReconcileState, Subscription

if TYPE_CHECKING:
    from amohook.store import Store

log = logging.getLogger("amohook.watchdog")

_said_no_admin: set[str] = set()


def destination_sha(destination: str) -> str:
    return hashlib.sha256(destination.encode("utf-8")).hexdigest()


def remember(
    store: Store, account: str, destination: str, events: Sequence[str], clock: Callable[[], float] = time.time
) -> None:
    """Record (byte for byte) a destination amohook subscribed, so the watchdog looks after it."""
    sha = destination_sha(destination)
    with store.write():
        updated = (
            Subscription.update(events=json.dumps(list(events)), updated_at=clock(), removed_at=None)
            .where((Subscription.account == account) & (Subscription.destination_sha256 == sha))
            .execute()
        )
        if not updated:
            Subscription.insert(
                account=account,
                destination=destination,
                destination_sha256=sha,
                events=json.dumps(list(events)),
                created_at=clock(),
                updated_at=clock(),
            ).on_conflict_ignore().execute()


def forget(store: Store, account: str, destination: str) -> None:
    with store.write():
        Subscription.delete().where(
            (Subscription.account == account) & (Subscription.destination_sha256 == destination_sha(destination))
        ).execute()


def watched(account: str) -> list[Subscription]:
    return list(Subscription.select().where(Subscription.account == account).order_by(Subscription.id))


def check_subscriptions(
    store: Store, client, account: str, *, clock: Callable[[], float] = time.time
) -> tuple[str, str | None]:
    """Look at ``account``'s subscriptions (one GET when all is well); returns (state, note).

    States: ``ok``; ``re-enabled`` (one was off, or removed by amohook itself, and is on again);
    ``disabled`` (still off after both ways of switching it on); ``missing`` (amohook subscribed
    it and someone else removed it); ``unknown`` (no admin token, or nothing amohook subscribed).
    A request that fails on the way raises; what amohook removed stays marked, so the next pass
    adds it again.
    """
    from amohook.amocrm.subscriptions import AdminRequired, list_webhooks

    ours = watched(account)
    state, note, reenabled = "unknown", None, 0
    if not ours:
        note = "amohook subscribed no destination for this account (`amohook webhooks subscribe`)"
    else:
        try:
            current = {hook.destination: hook for hook in list_webhooks(client)}
        except AdminRequired as exc:
            note = "cannot look at webhook subscriptions: the token's user is not an account admin"
            if account not in _said_no_admin:
                log.warning("watchdog for '%s': %s", account, exc.message)
                _said_no_admin.add(account)
            current = None
        if current is not None:
            problems: list[str] = []
            state = "ok"
            for sub in ours:
                events = json.loads(sub.events or "[]")
                hook = current.get(sub.destination)
                if hook is not None and sub.removed_at is not None:
                    _mark_removed(store, sub, None)  # back (or the DELETE never landed)
                if hook is None and sub.removed_at is not None:
                    on = _re_add(store, client, account, sub, events)
                elif hook is None:
                    problems.append(f"{redact_destination(sub.destination)} is missing (removed in amoCRM?)")
                    state = "missing"
                    log.warning(
                        "watchdog for '%s': the subscription %s is gone from amoCRM — run "
                        "`amohook webhooks subscribe` again if it should exist",
                        account,
                        redact_destination(sub.destination),
                    )
                    continue
                elif not hook.disabled:
                    continue
                else:
                    log.warning(
                        "watchdog for '%s': amoCRM switched the subscription %s off (too many failed "
                        "deliveries); switching it back on",
                        account,
                        redact_destination(sub.destination),
                    )
                    on = _switch_on(store, client, sub, events or list(hook.events))
                if on:
                    reenabled += 1
                    if state == "ok":
                        state = "re-enabled"
                    log.warning(
                        "watchdog for '%s': %s is on again; reconciliation brings what it missed",
                        account,
                        redact_destination(sub.destination),
                    )
                else:
                    state = "disabled"
                    problems.append(f"{redact_destination(sub.destination)} stays switched off")
                    log.error(
                        "watchdog for '%s': %s stays switched off after re-subscribing — check the "
                        "listener and switch it on in amoCRM's settings",
                        account,
                        redact_destination(sub.destination),
                    )
            note = "; ".join(problems) or None
    with store.write():
        ReconcileState.insert(account=account).on_conflict_ignore().execute()
        fields = dict(subscription_state=state, subscription_note=note, subscription_checked_at=clock())
        ReconcileState.update(**fields, reenabled_count=ReconcileState.reenabled_count + reenabled).where(
            ReconcileState.account == account
        ).execute()
    return state, note


def _mark_removed(store: Store, sub: Subscription, when: float | None) -> None:
    with store.write():
        Subscription.update(removed_at=when).where(Subscription.id == sub.id).execute()
    sub.removed_at = when


def _re_add(store: Store, client, account: str, sub: Subscription, events: list[str]) -> bool:
    """A destination amohook removed itself (to switch it on) and could not add back: add it now."""
    from amohook.amocrm.subscriptions import list_webhooks, subscribe

    log.warning(
        "watchdog for '%s': %s is gone since amohook removed it to switch it back on (adding it again failed); "
        "adding it again",
        account,
        redact_destination(sub.destination),
    )
    subscribe(client, sub.destination, events)
    _mark_removed(store, sub, None)
    return _is_on(list_webhooks(client, sub.destination), sub.destination)


def _switch_on(store: Store, client, sub: Subscription, events: list[str]) -> bool:
    """Re-subscribe; if amoCRM keeps it off, remove it and add it again. True when it is on.

    The removal is written down before the DELETE is sent and cleared once the POST is answered:
    a POST that fails (a 502, a timeout, a kill) leaves the mark, and the next look adds the
    destination back instead of reporting it missing (a person did not remove it)."""
    from amohook.amocrm.subscriptions import list_webhooks, subscribe, unsubscribe

    destination = sub.destination
    subscribe(client, destination, events)
    if _is_on(list_webhooks(client, destination), destination):
        return True
    _mark_removed(store, sub, time.time())
    unsubscribe(client, destination)
    subscribe(client, destination, events)
    _mark_removed(store, sub, None)
    return _is_on(list_webhooks(client, destination), destination)


def _is_on(hooks, destination: str) -> bool:
    return any(h.destination == destination and not h.disabled for h in hooks)


def redact_destination(destination: str, secrets: Iterable[str] = ()) -> str:
    """A destination as it may be shown: never the webhook secret, wherever it stands.

    amohook's own destinations carry the secret in the path — after ``/webhook/``, or under any
    other segment a proxy maps to it (``/amo/<secret>``). Cut: everything after a ``webhook``
    segment, every path segment as long as a secret may be (``MIN_SECRET_LENGTH``: the listener
    refuses shorter ones, so this holds even where the secret is not known), the ``secrets`` given
    and those this process holds, wherever they appear, user info, and the query or fragment.
    """
    from amohook.redact import MIN_SECRET_LENGTH, printable, redact_secrets

    text = str(destination)
    base = re.split(r"[?#]", text, maxsplit=1)[0]
    parts = base.split("/")
    if len(parts) > 2 and "@" in parts[2]:
        parts[2] = "***@" + parts[2].rsplit("@", 1)[1]
    shown = parts[:3]
    for i, part in enumerate(parts[3:], start=3):
        if part.lower() in ("webhook", "webhooks") and i + 1 < len(parts):
            shown += [part, "***"]
            break
        shown.append("***" if len(part) >= MIN_SECRET_LENGTH else part)
    result = "/".join(shown) + ("?***" if len(base) < len(text) else "")
    return printable(redact_secrets(result, secrets, patterns=False))
