"""The bridge between the worker and the rules: turn a queued event into recorded actions.

Handling an event does no amoCRM write: it matches the compiled rules, plans each task (with its
deterministic key) and records it. The ``ActionSender`` sends what was recorded, in batches.
A lead is fetched only when the hook lacks what the task needs (Digital Pipeline hooks carry ids).
"""

from __future__ import annotations

import time
from typing import Callable

from dataclasses import replace

from amohook.actions import record_planned
from amohook.changes import identify, sighting_of
from amohook.rules import CompiledRule, lead_changes, matches, needs_lead, plan_note, plan_task
from amohook.store.models import Account


class RulesHandler:
    """A worker handler: ``handler(event, ctx)``."""

    def __init__(self, rules: list[CompiledRule], store, *, on_recorded: Callable[[int], None] | None = None):
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
        changes = lead_changes(event.entity, event.action, event.data)
        if not changes:
            return 0
        planned = []
        single = len({r.account for r in self.rules}) == 1
        account = event.account or (self.rules[0].account if single and self.rules else None)
        for change in changes:
            if account:
                # The same change seen as a webhook and in the events log is one change: its
                # first sighting's time names it in every action key (amohook.changes).
                identity = identify(
                    self.store, sighting_of(account, change, source=getattr(event, "source", None),
                                            received_at=event.received_at),
                )
                change = replace(change, changed_at=str(identity.key_at))
            for rule in self.rules:
                if event.account and event.account != rule.account:
                    continue
                if not event.account and not single:
                    continue
                if not matches(rule, change):
                    continue
                lead = None
                if needs_lead(rule, change):
                    lead = ctx.client(rule.account).get(f"/api/v4/leads/{change.lead_id}")
                    if lead is None:  # 204: the lead is gone; nothing to remind anyone of
                        continue
                fallback = f"delivery:{event.delivery_id}"
                note = plan_note(rule, change, fallback=fallback, lead=lead)
                if note is not None:
                    planned.append(note)
                if rule.spec.create_task is None:
                    continue
                task = plan_task(
                    rule,
                    change,
                    base_time=event.received_at,
                    timezone=self.timezone(rule.account),
                    fallback=fallback,
                    lead=lead,
                )
                if task is not None:
                    planned.append(task)
                else:
                    ctx.logger.warning(
                        "rule %r: lead %s has no responsible user in the hook or in amoCRM; no task created",
                        rule.name, change.lead_id,
                    )
        new = record_planned(self.store, planned, event.id)
        if new and self.on_recorded:
            self.on_recorded(new)
        return new
