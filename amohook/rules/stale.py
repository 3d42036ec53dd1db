"""The stale check: find leads that have stayed in a lead.stale rule's stage for its ``after``.

A periodic pass per account (it runs after each reconciliation pass, so the change registry has
caught up with amoCRM's events log). For every (pipeline, stage) a lead.stale rule watches it:

1. lists the leads in the stage now — ``GET /api/v4/leads?filter[statuses][0][pipeline_id]=…&
   filter[statuses][0][status_id]=…``, pages of 250 (amoCRM's docs: crm_platform/filters-api and
   crm_platform/leads-api) — so a lead that left is simply not there;
2. settles when each of them entered (``StaleEntry``, kept once chosen): the latest stage change
   into it that amohook saw (the change registry, ``amohook.recovery.identity``); for a lead
   amohook never saw move, amoCRM's events log (``lead_status_changed`` of ten leads a request,
   crm_platform/events-and-notes), once; a lead the log shows no move for was created in the stage
   (its ``created_at``); a lead whose move into the stage is not known yet (its webhook still in
   the queue, the log behind) is looked at again next time;
3. queues one event per stay and ``after`` once the lead has been there that long: a delivery keyed
   by (account, lead, pipeline, stage, entered_at, after), so checks, restarts and several processes
   queue it once. The worker runs it through the rules like any webhook (``source = "stale"``);
   the action key is the stay's (``amohook.actions.base.action_key``), so replays make nothing new.

Cost: ``ceil(N / 250)`` requests for N leads in a stage every check, plus, once per lead amohook
never saw enter, one request per ten such leads (docs/rules.md and ``bench/stale.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from amohook.rules.changes import STALE_ACTION, as_int, webhook_custom_fields
from amohook.store import lease as leases
from amohook.store.models import ChangeSeen, Delivery, Event, StaleEntry

if TYPE_CHECKING:
    from amohook.rules.compile import CompiledRule
    from amohook.store import Store

log = logging.getLogger("amohook.stale")

SOURCE = "stale"  # Event.source of a stay the check queued
LEADS_PATH = "/api/v4/leads"
EVENTS_PATH = "/api/v4/events"
PAGE = 250  # the leads list's maximum limit (crm_platform/leads-api)
LOG_PAGE = 100  # the events list's maximum limit (crm_platform/events-and-notes)
LOG_IDS = 10  # filter[entity_id] takes at most ten ids (crm_platform/events-and-notes)
SETTLE = 600  # seconds: a lead edited this recently, of no known move, may have moved in just now
TOLERANCE = 10  # seconds: one entry seen two ways (a webhook's last_modified, the log's created_at)
CHECK_LEASE_TTL = 900.0
CHUNK = 250  # rows per statement or transaction


@dataclass
class StaleResult:
    """What one check of one account did (``as_dict``: its JSON)."""

    account: str
    stages: int = 0
    in_stage: int = 0  # leads listed in the watched stages
    looked_up: int = 0  # leads whose entry was looked for in the events log
    waiting: int = 0  # leads whose move into the stage is not known yet
    queued: int = 0  # stays queued (one event per stay and `after`)
    requests: int = 0
    busy: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def stay_sha(account: str, lead_id: int, pipeline_id: int, status_id: int, entered_at: int, after: int) -> str:
    """The queue's duplicate key of one stay and ``after``: the same stay is queued once."""
    raw = f"amohook:{SOURCE}:{account}:{lead_id}:{pipeline_id}:{status_id}:{entered_at}:{after}"
    return hashlib.sha256(raw.encode()).hexdigest()


def stale_rules(rules: Iterable[CompiledRule]) -> list[CompiledRule]:
    return [r for r in rules if r.spec.when == "lead.stale"]


class StaleCheck:
    """The check for one set of compiled rules; ``check(account, client)`` is one pass."""

    def __init__(self, store: Store, rules: Iterable[CompiledRule], *, clock: Callable[[], float] = time.time):
        self.store = store
        self.rules = stale_rules(rules)
        self.clock = clock
        self.last: dict[str, StaleResult] = {}
        self._renew: Callable[[], object] = lambda: None
        self._said: dict[str, str] = {}

    def __bool__(self) -> bool:
        return bool(self.rules)

    def stages(self, account: str) -> dict[tuple[int, int], list[int]]:
        """{(pipeline, stage): the rules' `after`s} of this account's lead.stale rules."""
        out: dict[tuple[int, int], set[int]] = {}
        for rule in self.rules:
            if (
                rule.account == account
                and rule.pipeline_id is not None
                and rule.stage_id is not None
                and rule.spec.after
            ):
                out.setdefault((rule.pipeline_id, rule.stage_id), set()).add(rule.spec.after)
        return {stage: sorted(afters) for stage, afters in out.items()}

    def after_pass(self, account: str, client) -> StaleResult | None:
        """The check as the reconciler runs it: a failure is one WARNING line, said once until it
        changes, and never stops the passes of other accounts."""
        if not self.stages(account):
            return None
        try:
            result = self.check(account, client)
        except Exception as exc:
            message = (getattr(exc, "message", None) or str(exc) or type(exc).__name__).splitlines()[0][:300]
            if self._said.get(account) != message:
                log.warning("stale check of '%s' failed: %s", account, message)
                self._said[account] = message
            return None
        self._said.pop(account, None)
        self.last[account] = result
        if result.queued:
            log.info("stale check of '%s': %d lead(s) stayed long enough; queued", account, result.queued)
        return result

    def check(self, account: str, client) -> StaleResult:
        result = StaleResult(account=account)
        stages = self.stages(account)
        if not stages:
            return result
        owner, name = leases.new_owner(), f"stale:{account}"
        if not leases.try_acquire(name, owner, CHECK_LEASE_TTL):
            result.busy = True
            result.notes.append(f"{leases.describe_busy(name, 'checking for stale leads')}; skipped")
            return result
        before = client.requests_made
        # A first look at a big stage reads the log for minutes: the lease is renewed as it goes.
        self._renew = lambda: leases.renew(name, owner, CHECK_LEASE_TTL)
        try:
            for (pipeline_id, status_id), afters in stages.items():
                result.stages += 1
                self._check_stage(account, client, pipeline_id, status_id, afters, result)
                self._renew()
        finally:
            result.requests = client.requests_made - before
            leases.release(name, owner)
        return result

    # -- one stage ---------------------------------------------------------------------------------
    def _check_stage(
        self, account: str, client, pipeline_id: int, status_id: int, afters: list[int], result: StaleResult
    ) -> None:
        params = {"filter[statuses][0][pipeline_id]": pipeline_id, "filter[statuses][0][status_id]": status_id}
        leads: dict[int, dict] = {}
        for lead in client.iter_pages(LEADS_PATH, "leads", params, limit=PAGE):
            lead_id = as_int(lead.get("id")) if isinstance(lead, dict) else None
            # Never trust a filter blindly: only leads that are in the stage count.
            if lead_id is not None and (as_int(lead.get("pipeline_id")), as_int(lead.get("status_id"))) == (
                pipeline_id,
                status_id,
            ):
                leads[lead_id] = lead
        result.in_stage += len(leads)
        entered = self._entered(account, client, pipeline_id, status_id, leads, result)
        now = self._amo_now(client)
        due = [(lead_id, at, after) for lead_id, at in entered.items() for after in afters if at + after <= now]
        result.queued += self._queue(account, pipeline_id, status_id, leads, due, now)
        self._forget(account, pipeline_id, status_id, set(leads))

    def _amo_now(self, client) -> float:
        """Now on amoCRM's clock: entry times are amoCRM's, and the client learns this host's skew
        from each answer's Date header, so a fast host clock does not fire early."""
        skew = getattr(client, "clock_skew", None)
        return self.clock() - (skew if isinstance(skew, (int, float)) else 0.0)

    def _entered(
        self, account: str, client, pipeline_id: int, status_id: int, leads: dict[int, dict], result: StaleResult
    ) -> dict[int, int]:
        """{lead: when it entered the stage} for the leads whose entry is settled."""
        target = f"{pipeline_id}:{status_id}"
        ids = sorted(leads)
        latest: dict[int, tuple[str, int]] = {}  # the registry's latest stage change of each lead
        known: dict[int, int] = {}
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            for row in (
                ChangeSeen.select(ChangeSeen.lead_id, ChangeSeen.target, ChangeSeen.key_at)
                .where(
                    (ChangeSeen.account == account)
                    & (ChangeSeen.kind == "stage_changed")
                    & ChangeSeen.lead_id.in_(chunk)
                )
                .order_by(ChangeSeen.key_at, ChangeSeen.id)
            ):
                latest[row.lead_id] = (row.target, row.key_at)
            for entry in StaleEntry.select(StaleEntry.lead_id, StaleEntry.entered_at).where(
                (StaleEntry.account == account)
                & (StaleEntry.pipeline_id == pipeline_id)
                & (StaleEntry.status_id == status_id)
                & StaleEntry.lead_id.in_(chunk)
            ):
                known[entry.lead_id] = entry.entered_at
        settled: dict[int, tuple[int, str]] = {}  # newly chosen entries: (entered_at, how)
        entered: dict[int, int] = {}
        unknown: list[int] = []
        for lead_id in ids:
            seen, kept = latest.get(lead_id), known.get(lead_id)
            if seen is not None and seen[0] == target:
                # The same entry seen two ways keeps its first time; a later entry is a new stay.
                if kept is not None and kept >= seen[1] - TOLERANCE:
                    entered[lead_id] = kept
                else:
                    entered[lead_id] = seen[1]
                    settled[lead_id] = (seen[1], "registry")
            elif seen is not None and (kept is None or seen[1] > kept + TOLERANCE):
                unknown.append(lead_id)  # its last known move went elsewhere: the move back is news
            elif kept is not None:
                entered[lead_id] = kept
            else:
                unknown.append(lead_id)
        if unknown:
            result.looked_up += len(unknown)
            found = self._from_log(client, pipeline_id, status_id, unknown)
            now = self._amo_now(client)
            for lead_id in unknown:
                lead, seen = leads[lead_id], latest.get(lead_id)
                at = found.get(lead_id)
                if at is not None and (seen is None or at > seen[1] + TOLERANCE or seen[0] == target):
                    entered[lead_id] = at
                    settled[lead_id] = (at, "events_log")
                    continue
                if at is None and seen is None and found.get(-lead_id) is None:
                    # No move in the log at all: the lead was created in this stage, unless it was
                    # touched so recently that its move may not be in the log yet.
                    created, updated = as_int(lead.get("created_at")), as_int(lead.get("updated_at"))
                    if created is not None and (updated is None or updated <= now - SETTLE or updated == created):
                        entered[lead_id] = created
                        settled[lead_id] = (created, "created")
                        continue
                result.waiting += 1
        self._keep(account, pipeline_id, status_id, settled)
        return entered

    def _from_log(self, client, pipeline_id: int, status_id: int, lead_ids: list[int]) -> dict[int, int]:
        """{lead: the latest log entry into the stage}; {-lead: 1} when its latest move went elsewhere."""
        out: dict[int, int] = {}
        for start in range(0, len(lead_ids), LOG_IDS):
            if start and start % (LOG_IDS * 100) == 0:
                self._renew()
            chunk = lead_ids[start : start + LOG_IDS]
            params = {"filter[type]": "lead_status_changed", "filter[entity]": "lead", "filter[entity_id][]": chunk}
            latest: dict[int, tuple[int, str, Any]] = {}
            for event in client.iter_pages(EVENTS_PATH, "events", params, limit=LOG_PAGE):
                if not isinstance(event, dict):
                    continue
                lead_id, at = as_int(event.get("entity_id")), as_int(event.get("created_at"))
                if lead_id not in chunk or at is None:
                    continue
                key = (at, str(event.get("id")), event.get("value_after"))
                if lead_id not in latest or key[:2] > latest[lead_id][:2]:
                    latest[lead_id] = key
            for lead_id, (at, _, after) in latest.items():
                stage = _lead_status(after)
                if stage == (pipeline_id, status_id):
                    out[lead_id] = at
                else:
                    out[-lead_id] = 1
        return out

    # -- the store ---------------------------------------------------------------------------------
    def _keep(self, account: str, pipeline_id: int, status_id: int, settled: dict[int, tuple[int, str]]) -> None:
        items = list(settled.items())
        for start in range(0, len(items), CHUNK):
            with self.store.write():
                for lead_id, (at, how) in items[start : start + CHUNK]:
                    where = (
                        (StaleEntry.account == account)
                        & (StaleEntry.pipeline_id == pipeline_id)
                        & (StaleEntry.status_id == status_id)
                        & (StaleEntry.lead_id == lead_id)
                    )
                    if not StaleEntry.update(entered_at=at, how=how, seen_at=self.clock()).where(where).execute():
                        StaleEntry.insert(
                            account=account,
                            lead_id=lead_id,
                            pipeline_id=pipeline_id,
                            status_id=status_id,
                            entered_at=at,
                            how=how,
                            seen_at=self.clock(),
                        ).on_conflict_ignore().execute()

    def _forget(self, account: str, pipeline_id: int, status_id: int, present: set[int]) -> None:
        """Drop the entries of leads no longer in the stage: coming back is a new stay."""
        gone = [
            row.id
            for row in StaleEntry.select(StaleEntry.id, StaleEntry.lead_id).where(
                (StaleEntry.account == account)
                & (StaleEntry.pipeline_id == pipeline_id)
                & (StaleEntry.status_id == status_id)
            )
            if row.lead_id not in present
        ]
        for start in range(0, len(gone), CHUNK):
            with self.store.write():
                StaleEntry.delete().where(StaleEntry.id.in_(gone[start : start + CHUNK])).execute()

    def _queue(
        self,
        account: str,
        pipeline_id: int,
        status_id: int,
        leads: dict[int, dict],
        due: list[tuple[int, int, int]],
        now: float,
    ) -> int:
        """One delivery and event per stay and ``after``; a stay already queued is skipped."""
        queued = 0
        for start in range(0, len(due), CHUNK):
            batch = {
                stay_sha(account, lead_id, pipeline_id, status_id, at, after): (lead_id, at, after)
                for lead_id, at, after in due[start : start + CHUNK]
            }
            with self.store.write():
                have = {
                    row.body_sha256
                    for row in Delivery.select(Delivery.body_sha256).where(Delivery.body_sha256.in_(list(batch)))
                }
                for sha, (lead_id, at, after) in batch.items():
                    if sha in have:
                        continue
                    item = stale_item(leads[lead_id], pipeline_id, status_id, at, after)
                    delivery = Delivery.create(
                        body_sha256=sha,
                        body=json.dumps(
                            {
                                "stale": {
                                    "lead": lead_id,
                                    "pipeline_id": pipeline_id,
                                    "status_id": status_id,
                                    "entered_at": at,
                                    "after": after,
                                }
                            },
                            sort_keys=True,
                        ),
                        content_type="application/json",
                        headers=json.dumps({"x-amohook-source": SOURCE}),
                        remote_addr=None,
                        received_at=now,
                    )
                    Event.create(
                        delivery_id=delivery.id,
                        idx=0,
                        entity="leads",
                        action=STALE_ACTION,
                        entity_id=str(lead_id),
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


def _lead_status(values: Any) -> tuple[int | None, int | None] | None:
    """(pipeline, status) of a ``lead_status_changed`` entry's ``value_after``."""
    if isinstance(values, list):
        for item in values:
            block = item.get("lead_status") if isinstance(item, dict) else None
            if isinstance(block, dict):
                return as_int(block.get("pipeline_id")), as_int(block.get("id"))
    return None


def _s(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)[:255]


def stale_item(lead: dict, pipeline_id: int, status_id: int, entered_at: int, after: int) -> dict:
    """The queued item of one stay (API v2 shape, every value a string, like a webhook's): what
    the rules and their templates read, from the lead as the listing showed it."""
    item: dict[str, Any] = {
        "id": _s(lead.get("id")),
        "name": _s(lead.get("name")),
        "price": _s(lead.get("price")),
        "responsible_user_id": _s(lead.get("responsible_user_id")),
        "pipeline_id": str(pipeline_id),
        "status_id": str(status_id),
        "entered_at": str(entered_at),
        "stale_after": str(after),
        "account_id": _s(lead.get("account_id")),
    }
    if fields := webhook_custom_fields(lead):
        item["custom_fields"] = fields
    return {k: v for k, v in item.items() if v is not None}


def requests_per_check(in_stage: int, first_look: int = 0) -> int:
    """What a check costs: the listing (pages of 250, at least one) and the log look-ups (ten leads
    a request) for the leads amohook never saw enter."""
    return max(1, math.ceil(in_stage / PAGE)) + math.ceil(first_look / LOG_IDS)
