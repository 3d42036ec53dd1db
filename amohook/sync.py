"""Pull amoCRM's reference entities into the store: pipelines and stages, task types, users, lead
custom fields.

Each kind is fetched completely first and then written in one transaction (insert new rows,
update changed ones, delete the ones amoCRM no longer has), so a failure while fetching leaves the
previous rows of that kind exactly as they were. Rows that vanished are deleted, not marked gone:
the rules resolve names through the store (``amohook.lookup``), and a stage that no longer exists
should fail loudly there, with suggestions, rather than resolve to an id amoCRM will reject.

Only the library lives here: no typer, no rich. Progress goes to an optional callback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from amohook.errors import (
    AmoApiError,
    AmohookError,
    AmoTemporaryError,
    Forbidden,
    RateLimited,
    RefreshOutcomeUnknown,
    needs_person,
)
from amohook.store.lease import lease
from amohook.store.models import Account, CustomField, Pipeline, Stage, TaskType, User

if TYPE_CHECKING:
    from amohook.store import Store

KINDS = ("pipelines", "task_types", "users", "custom_fields")
# What the summary reports: pipelines and their stages come from one request and one transaction
# but are counted apart.
REPORTED = ("pipelines", "stages", "task_types", "users", "custom_fields")
SYNC_LEASE_TTL = 600.0
INSERT_CHUNK = 100  # rows per INSERT: well under SQLite's bound-variable limit at 8 columns

USERS_NOT_ADMIN = "the token's user is not an admin (GET /api/v4/users needs admin rights)"
NOT_TRIED = "not tried: the sync stopped at an earlier error"


@dataclass
class KindResult:
    """What one kind's sync did."""

    kind: str
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: str | None = None  # why nothing was fetched (e.g. users without admin rights)
    error: AmohookError | None = None  # why the fetch failed; the stored rows were left as they were
    requests: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        """Rows of this kind in the store after the sync."""
        return self.added + self.changed + self.unchanged

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        if self.skipped is not None:
            return "skipped"
        return "ok"

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "status": self.status,
            "added": self.added,
            "changed": self.changed,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "total": None if self.status != "ok" else self.total,
            "skipped": self.skipped,
            "error": None if self.error is None else self.error.message,
            "requests": self.requests,
        }


@dataclass
class SyncReport:
    """The outcome of one account's sync: one ``KindResult`` per reported kind."""

    account: str
    results: list[KindResult] = field(default_factory=list)
    requests: int = 0
    rate_limited: int = 0
    seconds: float = 0.0

    def result(self, kind: str) -> KindResult:
        return next(r for r in self.results if r.kind == kind)

    @property
    def error(self) -> AmohookError | None:
        """The first failure, if any kind failed."""
        return next((r.error for r in self.results if r.error is not None), None)

    @property
    def ok(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> None:
        if self.error is not None:
            raise self.error

    def as_dict(self) -> dict:
        return {
            "account": self.account,
            "ok": self.ok,
            "kinds": [r.as_dict() for r in self.results],
            "requests": self.requests,
            "rate_limited": self.rate_limited,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class Progress:
    """One step of a sync, for a progress display: ``phase`` is fetch, write, done, skipped or failed."""

    account: str
    kind: str
    phase: str
    fetched: int = 0


ProgressCallback = Callable[[Progress], None]


def _fatal(exc: AmohookError) -> bool:
    """Errors after which trying the next kind only makes things worse or cannot work: a blocked
    account, a revoked grant, persistent 429s, no answer at all. An error of one endpoint (a 5xx,
    a 403 JSON, an odd answer) does not stop the other kinds."""
    if needs_person(exc) or isinstance(exc, (RateLimited, RefreshOutcomeUnknown)):
        return True
    if isinstance(exc, AmoTemporaryError):
        return exc.status is None  # no HTTP answer: amoCRM (or the network) is down for every kind
    return not isinstance(exc, AmoApiError)


# -- pure: amoCRM items -> rows ---------------------------------------------------------------
def _text(value: Any, limit: int) -> str | None:
    """Fit a string into its column (PostgreSQL refuses what is too long; MySQL would truncate)."""
    if value is None:
        return None
    return str(value)[:limit]


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _id(item: Any, what: str) -> int:
    if not isinstance(item, dict) or not isinstance(item.get("id"), int) or isinstance(item.get("id"), bool):
        raise AmoApiError(
            f"amoCRM sent a {what} without a numeric id ({str(item)[:80]}); nothing of this kind was changed"
        )
    return item["id"]


def pipeline_rows(items: Iterable[dict]) -> tuple[dict, dict]:
    """(pipelines by amo id, stages by (pipeline id, status id)) from GET /api/v4/leads/pipelines."""
    pipelines: dict = {}
    stages: dict = {}
    for item in items:
        pid = _id(item, "pipeline")
        pipelines[(pid,)] = dict(
            amo_id=pid,
            name=_text(item.get("name") or "", 255),
            sort=_int(item.get("sort")),
            is_main=bool(item.get("is_main")),
            is_archive=bool(item.get("is_archive")),
        )
        for status in (item.get("_embedded") or {}).get("statuses") or []:
            sid = _id(status, "pipeline status")
            # 142 ("won") and 143 ("lost") exist in every pipeline: the key is (pipeline, status).
            stages[(pid, sid)] = dict(
                pipeline_id=pid,
                amo_id=sid,
                name=_text(status.get("name") or "", 255),
                sort=_int(status.get("sort")),
                type=_int(status.get("type")),
                color=_text(status.get("color"), 32),
            )
    return pipelines, stages


def task_type_rows(items: Iterable[dict]) -> dict:
    rows = {}
    for item in items:
        tid = _id(item, "task type")
        rows[(tid,)] = dict(
            amo_id=tid,
            name=_text(item.get("name") or "", 255),
            code=_text(item.get("code"), 64),
            color=_text(item.get("color"), 32),
        )
    return rows


def user_rows(items: Iterable[dict]) -> dict:
    rows = {}
    for item in items:
        uid = _id(item, "user")
        rights = item.get("rights") or {}
        rows[(uid,)] = dict(
            amo_id=uid,
            name=_text(item.get("name") or "", 255),
            email=_text(item.get("email"), 255),
            is_admin=bool(rights.get("is_admin")),
            is_active=bool(rights.get("is_active", True)),
        )
    return rows


def custom_field_rows(items: Iterable[dict], entity_type: str = "leads") -> dict:
    rows = {}
    for item in items:
        fid = _id(item, "custom field")
        rows[(entity_type, fid)] = dict(
            entity_type=entity_type,
            amo_id=fid,
            name=_text(item.get("name") or "", 255),
            code=_text(item.get("code"), 64),
            type=_text(item.get("type"), 64),
            sort=_int(item.get("sort")),
            enums=_options(item.get("enums")),
        )
    return rows


MAX_OPTIONS_JSON = 1024 * 1024  # characters of one field's stored options


def _options(enums: Any) -> str | None:
    """A field's options (amoCRM's ``enums``: null or [{id, value, sort, code}]) as stored in
    ``CustomField.enums``: JSON [{"id", "value"}] in amoCRM's order. None when there are none, or
    when the list is not what the docs describe or is absurdly large: then `rules check` leaves
    the value to amoCRM, which checks it anyway (https://www.amocrm.ru/developers/content/crm_platform/custom-fields)."""
    if not isinstance(enums, list):
        return None
    options = []
    for option in enums:
        if not isinstance(option, dict) or not isinstance(option.get("value"), str):
            return None
        option_id = option.get("id")
        options.append({"id": option_id if type(option_id) is int else None, "value": option["value"]})
    # ASCII JSON: every backend stores it, whatever the names hold (a lone surrogate, a NUL).
    text = json.dumps(options, separators=(",", ":"))
    return text if len(text) <= MAX_OPTIONS_JSON else None


# -- writing ----------------------------------------------------------------------------------
def _apply(model, account: str, scope, key_fields: tuple[str, ...], incoming: dict, result: KindResult) -> None:
    """Make the account's rows of ``model`` within ``scope`` equal ``incoming``; call inside a transaction."""
    where = model.account == account
    if scope is not None:
        where &= scope
    existing = {tuple(getattr(row, f) for f in key_fields): row for row in model.select().where(where)}
    inserts = []
    for key, fields in incoming.items():
        row = existing.pop(key, None)
        if row is None:
            inserts.append({"account": account, **fields})
            continue
        diff = {name: value for name, value in fields.items() if getattr(row, name) != value}
        if diff:
            model.update(**diff).where(model.id == row.id).execute()
            result.changed += 1
        else:
            result.unchanged += 1
    gone = [row.id for row in existing.values()]
    for start in range(0, len(gone), 500):
        model.delete().where(model.id.in_(gone[start : start + 500])).execute()
    for start in range(0, len(inserts), INSERT_CHUNK):
        model.insert_many(inserts[start : start + INSERT_CHUNK]).execute()
    result.added += len(inserts)
    result.removed += len(gone)


# -- the sync ---------------------------------------------------------------------------------
class _Run:
    def __init__(self, store: Store, client, report: SyncReport, on_progress: ProgressCallback | None, clock):
        self.store = store
        self.client = client
        self.report = report
        self.on_progress = on_progress
        self.clock = clock

    def progress(self, kind: str, phase: str, fetched: int = 0) -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(self.report.account, kind, phase, fetched))

    def fetch_all(self, kind: str, path: str, key: str, params: dict | None = None) -> list[dict]:
        """Every item of a HAL list, reporting progress per item."""
        items = []
        self.progress(kind, "fetch", 0)
        for item in self.client.iter_pages(path, key, params):
            items.append(item)
            self.progress(kind, "fetch", len(items))
        return items

    def pipelines(self, results: dict[str, KindResult]) -> None:
        items = self.fetch_all("pipelines", "/api/v4/leads/pipelines", "pipelines")
        pipelines, stages = pipeline_rows(items)
        self.progress("pipelines", "write", len(items))
        with self.store.write():
            _apply(Pipeline, self.report.account, None, ("amo_id",), pipelines, results["pipelines"])
            _apply(Stage, self.report.account, None, ("pipeline_id", "amo_id"), stages, results["stages"])

    def task_types(self, results: dict[str, KindResult]) -> None:
        self.progress("task_types", "fetch", 0)
        # datetime_settings rides along for free: the account's timezone, which due dates need.
        data = self.client.account_info(("task_types", "datetime_settings"))
        embedded = data.get("_embedded") or {}
        rows = task_type_rows(embedded.get("task_types") or [])
        timezone = _text((embedded.get("datetime_settings") or {}).get("timezone"), 64)
        self.progress("task_types", "write", len(rows))
        with self.store.write():
            _apply(TaskType, self.report.account, None, ("amo_id",), rows, results["task_types"])
            if timezone:
                Account.update(timezone=timezone).where(
                    (Account.subdomain == self.report.account)
                    & ((Account.timezone.is_null()) | (Account.timezone != timezone))
                ).execute()

    def users(self, results: dict[str, KindResult]) -> None:
        try:
            items = self.fetch_all("users", "/api/v4/users", "users")
        except Forbidden:
            # "Метод доступен только с правами администратора аккаунта" (DOCS users-api, docs/amocrm.md §4).
            results["users"].skipped = USERS_NOT_ADMIN
            return
        rows = user_rows(items)
        self.progress("users", "write", len(rows))
        with self.store.write():
            _apply(User, self.report.account, None, ("amo_id",), rows, results["users"])

    def custom_fields(self, results: dict[str, KindResult]) -> None:
        items = self.fetch_all("custom_fields", "/api/v4/leads/custom_fields", "custom_fields")
        rows = custom_field_rows(items, "leads")
        self.progress("custom_fields", "write", len(rows))
        with self.store.write():
            _apply(
                CustomField,
                self.report.account,
                CustomField.entity_type == "leads",
                ("entity_type", "amo_id"),
                rows,
                results["custom_fields"],
            )


def _members(kind: str) -> tuple[str, ...]:
    return ("pipelines", "stages") if kind == "pipelines" else (kind,)


def sync_entities(
    store: Store,
    client,
    *,
    kinds: Iterable[str] = KINDS,
    on_progress: ProgressCallback | None = None,
    clock: Callable[[], float] = time.monotonic,
    lease_wait: float = 0.0,
) -> SyncReport:
    """Sync the client's account; returns a report. A failed kind keeps its old rows and is
    recorded in the report (``report.raise_for_error()``); errors that make further requests
    pointless (blocked account, revoked grant, persistent 429) stop the sync at that kind.

    Two syncs of one account never overlap: the second gets ``LockBusy`` unless the first ends
    within ``lease_wait`` seconds.
    """
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; known: {KINDS}")
    account = client.subdomain
    report = SyncReport(account=account)
    results = {name: KindResult(name) for kind in kinds for name in _members(kind)}
    report.results = [results[name] for name in REPORTED if name in results]
    run = _Run(store, client, report, on_progress, clock)
    started, requests0, limited0 = clock(), client.requests_made, client.rate_limited
    with lease(f"sync:{account}", ttl=SYNC_LEASE_TTL, wait=lease_wait):
        for kind in kinds:
            members = [results[name] for name in _members(kind)]
            t0, r0 = clock(), client.requests_made
            try:
                getattr(run, kind)(results)
            except AmohookError as exc:
                for member in members:
                    member.error = exc
                    member.added = member.changed = member.removed = member.unchanged = 0
                run.progress(kind, "failed")
                if _fatal(exc):
                    for later in kinds[kinds.index(kind) + 1 :]:
                        for name in _members(later):
                            results[name].skipped = NOT_TRIED
                    break
            else:
                run.progress(kind, "skipped" if members[0].skipped else "done")
            finally:
                members[0].requests = client.requests_made - r0
                for member in members:
                    member.seconds = clock() - t0
    report.requests = client.requests_made - requests0
    report.rate_limited = client.rate_limited - limited0
    report.seconds = clock() - started
    return report
