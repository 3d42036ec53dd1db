"""The bridge between the worker and the rules: turn a queued event into recorded actions.

Handling an event does no amoCRM write: it matches the compiled rules, plans each action (with its
deterministic key) and records it. The ``ActionSender`` sends what was recorded, in batches.
A lead is read only when the hook lacks what a rule needs: Digital Pipeline hooks carry ids, and
a task hook says nothing of where its lead is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from amohook.actions import lead_changing_kinds, record_planned
from amohook.actions.base import PlannedAction
from amohook.recovery.identity import Sighting, identify, sighting_of
from amohook.rules.changes import LeadChange, as_int, rule_changes
from amohook.rules.compile import CompiledRule
from amohook.rules.guard import recent_changes, stop_reason
from amohook.rules.match import matches, might_match, needs_lead_state
from amohook.rules.plan import PlanContext, needs_lead, plan_actions
from amohook.rules.stale import SOURCE as STALE_SOURCE
from amohook.store.models import Account

if TYPE_CHECKING:
    from amohook.store import Store


def with_lead_state(change: LeadChange, lead: dict) -> LeadChange:
    """The change completed with what amoCRM says of the lead now (API v4 shape)."""
    fields = []
    for cf in lead.get("custom_fields_values") or []:
        values = tuple(str(v.get("value")) for v in cf.get("values") or [] if v.get("value") not in (None, ""))
        fields.append((as_int(cf.get("field_id")), str(cf.get("field_name") or ""), values))
    return replace(
        change,
        pipeline_id=as_int(lead.get("pipeline_id")),
        status_id=as_int(lead.get("status_id")),
        responsible_user_id=change.responsible_user_id or as_int(lead.get("responsible_user_id")),
        name=change.name if change.name is not None else lead.get("name"),
        price=change.price
        if change.price is not None
        else str(lead.get("price") if lead.get("price") is not None else ""),
        custom_fields=tuple(fields),
    )


class RulesHandler:
    """A worker handler: ``handler(event, ctx)``."""

    def __init__(self, rules: list[CompiledRule], store: Store, *, on_recorded: Callable[[int], None] | None = None):
        self.rules = rules
        self.store = store
        self.on_recorded = on_recorded
        self._timezones: dict[str, tuple[float, str | None]] = {}
        self._connected: dict[str, tuple[float, float | None]] = {}

    def timezone(self, account: str) -> str | None:
        cached = self._timezones.get(account)
        if cached and time.monotonic() - cached[0] < 300:
            return cached[1]
        row = Account.get_or_none(Account.subdomain == account)
        tz = row.timezone if row else None
        self._timezones[account] = (time.monotonic(), tz)
        return tz

    def __call__(self, event, ctx) -> int:
        planned = self.plan(event, ctx, lambda s: identify(self.store, s).key_at)
        if not planned:
            return 0
        new = record_planned(self.store, self.guard(planned, ctx), event.id, look_first=self.look_first(event))
        if new and self.on_recorded:
            self.on_recorded(new)
        return new

    def look_first(self, event) -> bool:
        """Should this event's actions be looked up in amoCRM before they are sent? Yes for a change
        only the events log brought from before this store was connected (a `reconcile --since`
        catch-up): another store may have acted on it. Then its actions start as ones whose answer
        was lost (``amohook.actions``). Changes since the connection are this store's alone: no
        lookup, so worker-only mode costs no extra request. A stale lead's stay (``source =
        "stale"``) always looks first: another store on the account may have found the same stay
        (one task lookup per batch of up to 50)."""
        if getattr(event, "source", None) == STALE_SOURCE:
            return True
        if getattr(event, "source", None) != "events_log" or not event.account:
            return False
        try:
            changed_at = int(event.data.get("last_modified"))
        except (TypeError, ValueError, AttributeError):
            return True  # cannot tell when: look
        cached = self._connected.get(event.account)
        if cached is None or time.monotonic() - cached[0] > 300:
            from amohook.recovery.identity import connected_at

            cached = (time.monotonic(), connected_at(event.account))
            self._connected[event.account] = cached
        return cached[1] is None or changed_at < cached[1]

    def plan(self, event, ctx, identify_change: Callable[[Sighting], int]) -> list[PlannedAction]:
        """The actions the rules plan for ``event``, recording nothing; ``identify_change`` names a
        lead change (the time of its first sighting): ``amohook.recovery.identity.identify`` when handling,
        a read-only look when previewing (`reconcile --dry-run`)."""
        changes = rule_changes(event.entity, event.action, event.data)
        if not changes:
            return []
        planned: list[PlannedAction] = []
        single = len({r.account for r in self.rules}) == 1
        account = event.account or (self.rules[0].account if single and self.rules else None)
        for change in changes:
            if account and change.kind not in ("task_completed", "stale"):  # identified by themselves
                # The same change seen as a webhook and in the events log is one change: its
                # first sighting's time names it in every action key (amohook.recovery.identity).
                key_at = identify_change(
                    sighting_of(account, change, source=getattr(event, "source", None), received_at=event.received_at)
                )
                change = replace(change, changed_at=str(key_at))
            leads: dict[str, dict | None] = {}

            def lead_of(rule: CompiledRule, leads=leads, change=change) -> dict | None:  # this change's leads
                if rule.account not in leads:  # one read per lead, however many rules ask
                    leads[rule.account] = ctx.client(rule.account).get(f"/api/v4/leads/{change.lead_id}")
                return leads[rule.account]

            for rule in self.rules:
                if (event.account and event.account != rule.account) or (not event.account and not single):
                    continue
                if not might_match(rule, change):
                    continue
                seen, lead = change, None
                if needs_lead_state(rule, change):
                    lead = lead_of(rule)
                    if lead is None:  # 204: the lead is gone; nothing to do for it
                        continue
                    seen = with_lead_state(change, lead)
                if not matches(rule, seen):
                    continue
                if lead is None and needs_lead(rule, seen):
                    lead = lead_of(rule)
                    if lead is None:
                        continue
                plan = PlanContext(
                    base_time=event.received_at,
                    timezone=self.timezone(rule.account),
                    fallback=f"delivery:{event.delivery_id}",
                    lead=lead,
                )
                actions, notes = plan_actions(rule, seen, plan)
                for note in notes:
                    ctx.logger.warning("rule %r: %s", rule.name, note)
                planned.extend(actions)
        return planned

    def guard(self, planned: list, ctx) -> list:
        """Stop a chain of rule-made changes to one lead (``amohook.rules.guard``)."""
        changing = lead_changing_kinds()
        keys = [p.key for p in planned]
        counts: dict[tuple[str, int], int] = {}
        out = []
        for p in planned:
            if p.kind in changing and p.target_id is not None:
                at = (p.account, p.target_id)
                if at not in counts:
                    counts[at] = recent_changes(p.account, p.target_id, changing, time.time(), exclude=keys)
                reason = stop_reason(counts[at])
                if reason:
                    ctx.logger.warning("rule %r: lead %s: %s", p.rule, p.target_id, reason)
                    p = replace(p, skip_reason=reason)
                else:
                    counts[at] += 1
            out.append(p)
        return out
