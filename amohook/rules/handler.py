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
from amohook.recovery.identity import identify, sighting_of
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

    def timezone(self, account: str) -> str | None:
        cached = self._timezones.get(account)
        if cached and time.monotonic() - cached[0] < 300:
            return cached[1]
        row = Account.get_or_none(Account.subdomain == account)
        tz = row.timezone if row else None
        self._timezones[account] = (time.monotonic(), tz)
        return tz

    def __call__(self, event, ctx) -> int:
        changes = rule_changes(event.entity, event.action, event.data)
        if not changes:
            return 0
        planned = []
        single = len({r.account for r in self.rules}) == 1
        account = event.account or (self.rules[0].account if single and self.rules else None)
        for change in changes:
            if account and change.kind not in ("task_completed", "stale"):  # identified by themselves
                # The same change seen as a webhook and in the events log is one change: its
                # first sighting's time names it in every action key (amohook.recovery.identity).
                identity = identify(
                    self.store,
                    sighting_of(account, change, source=getattr(event, "source", None), received_at=event.received_at),
                )
                change = replace(change, changed_at=str(identity.key_at))
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
        # A stale lead's stay may have been acted on by another store on the account: look first.
        look_first = getattr(event, "source", None) == STALE_SOURCE
        new = record_planned(self.store, self.guard(planned, ctx), event.id, look_first=look_first)
        if new and self.on_recorded:
            self.on_recorded(new)
        return new

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
