"""A fake amoCRM (Kommo) account served over real HTTP, for amohook's tests.

``FakeAmo`` runs a ``ThreadingHTTPServer`` on 127.0.0.1 (random port) in a daemon thread and
answers the OAuth token endpoint and the few API v4 endpoints amohook uses, with the shapes,
status codes and quirks documented in /work/shared/amocrm/docs/amocrm.md (sections 2-4). Seed data is
built from copies of the documented sample answers in tests/fixtures/api/ (provenance:
/work/shared/fixtures/api/SOURCES.md). Standard library only.

Choices where the real behaviour is undocumented:
* A refresh rotates the pair: the old refresh token is spent, the old ACCESS token stays valid
  until its own expiry. Any bad refresh token (unknown, spent, revoked, expired) answers
  401 "Token has been revoked".
* Rate limit: a request is refused with 429 when ``rate_limit`` requests were ADMITTED in the
  preceding second (sliding window on ``rate_clock``, default ``time.monotonic``, NOT ``clock``
  so that moving the wall clock for token expiry never causes 429s). Refused (429), blocked
  (403) and fault-answered requests do not enter the window; all of them are still recorded.
  ``max_in_window`` counts every recorded arrival, refused or not.
* Token/code expiry, ``created_at`` and ``RecordedRequest.time`` use ``clock`` (default
  ``time.time``); pass any zero-argument callable to control it.
* POST /api/v4/tasks validates ``responsible_user_id`` against ``users`` and ``task_type_id``
  against ``task_types``; it does NOT check that the linked entity exists.
* The events log (``events``) is kept in an unspecified order: each event is inserted at a random
  position (``random.Random(events_seed)``), so code that trusts the served order fails, and an
  event added while a client pages shifts the pages (offset paging over the live list). An event
  is listed only once the fake's ``clock`` reaches its ``visible_at`` (``log_delay``).
* ``limit`` above 100 on /api/v4/events answers 50 items and no ``next`` link, like the real API.
* Webhook subscriptions: an empty list answers 204; a new subscription 201, an update of an existing
  destination 200; ``reenable_on_repost`` decides whether that update clears ``disabled``.
"""

from __future__ import annotations

import base64
import copy
import http.server
import json
import math
import random
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "api"

OAUTH_TYPE = "https://developers.amocrm.ru/v3/errors/OAuthProblemJson"
OAUTH_TITLE = "Некорректный запрос"
OAUTH_DETAIL = "В запросе отсутствует ряд параметров или параметры невалидны"
PROBLEM = "application/problem+json"
HAL = "application/hal+json"
BLOCKED_HTML = (
    b"<html>\r\n<head><title>403 Forbidden</title></head>\r\n<body>\r\n"
    b"<center><h1>403 Forbidden</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
URI_TOO_LONG_HTML = (
    b"<html>\r\n<head><title>414 Request-URI Too Large</title></head>\r\n<body>\r\n"
    b"<center><h1>414 Request-URI Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
ENTITY_TYPES = ("leads", "contacts", "companies", "customers")
# The 31 event codes of POST /api/v4/webhooks (crm_platform/webhooks-api).
WEBHOOK_EVENTS = frozenset(
    """
    responsible_lead responsible_contact responsible_company responsible_customer responsible_task
    restore_lead restore_contact restore_company add_lead add_contact add_company add_customer add_talk
    add_task update_lead update_contact update_company update_customer update_talk update_task delete_lead
    delete_contact delete_company delete_customer delete_task status_lead note_lead note_contact
    note_company note_customer add_chat_template_review""".split()
)
ENTITY_PLURAL = {
    "lead": "leads",
    "contact": "contacts",
    "company": "companies",
    "customer": "customers",
    "task": "tasks",
}
CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"  # lowercase, as amoCRM's event ids
EVENT_PAGE_MAX = 100  # documented maximum `limit` of /api/v4/events
EVENT_PAGE_OVER = 50  # what a larger limit gets (Krukov/amocrm_api#76), with no next link
# `with=` values of GET /api/v4/account: top-level keys shown only on request, and _embedded ones.
ACCOUNT_WITH_TOP = ("amojo_id", "uuid", "version", "entity_names", "drive_url", "is_api_filter_enabled")
ACCOUNT_WITH_EMBEDDED = ("amojo_rights", "users_groups", "task_types", "datetime_settings")

Response = tuple[int, dict[str, str], bytes]


def _load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(status: int, obj: Any, ctype: str = HAL) -> Response:
    return status, {"Content-Type": ctype}, json.dumps(obj, ensure_ascii=False).encode()


def problem(status: int, detail: str | None = None, title: str | None = None, **extra: Any) -> Response:
    """An API v4 error answer: ``{"title","type","status","detail"}`` as application/problem+json."""
    phrase = HTTPStatus(status).phrase
    body = {
        **extra,
        "title": title or phrase,
        "type": f"https://httpstatus.es/{status}",
        "status": status,
        "detail": detail or phrase,
    }
    return _json(status, body, PROBLEM)


def oauth_error(status: int, hint: str | None) -> Response:
    """The token endpoint's error envelope; ``hint=None`` leaves the key out (generic 400)."""
    body = {"hint": hint} if hint is not None else {}
    body.update(title=OAUTH_TITLE, type=OAUTH_TYPE, status=status, detail=OAUTH_DETAIL)
    return _json(status, body, PROBLEM)


def _strings(value: Any) -> Any:
    """Every scalar as a string, as API v2 webhook bodies carry them (None becomes "")."""
    if isinstance(value, dict):
        return {k: _strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strings(v) for v in value]
    return "" if value is None else str(value)


def _flatten(prefix: str, value: Any, pairs: list[tuple[str, str]]) -> None:
    """PHP-style bracket keys: {"a": {"b": [1]}} under p gives p[a][b][0]=1."""
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}[{key}]", inner, pairs)
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            _flatten(f"{prefix}[{index}]", inner, pairs)
    else:
        pairs.append((prefix, "" if value is None else str(value)))


class Headers(dict):
    """A dict of request headers (original spelling kept) with case-insensitive lookups."""

    def _key(self, key: str) -> str:
        return next((k for k in self if k.lower() == key.lower()), key)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(self._key(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(self._key(key))

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(self._key(key), default)


@dataclass
class RecordedRequest:
    method: str
    path: str  # without the query string
    query: dict[str, list[str]]
    headers: Headers
    body: bytes
    json: Any  # parsed JSON body or None
    form: dict[str, str] | None  # form-urlencoded body (last value per key) or None
    time: float  # clock() at arrival
    mono: float  # rate_clock() at arrival (the rate limiter's time base)
    ip: str
    port: int  # client port: same port = same keep-alive connection
    status: int | None = None  # status answered; None while in flight, dropped or hung
    fault: str | None = None  # "status" / "delay" / "drop" / "hang" if a fault applied
    target: str = ""  # the request target as sent (path and raw query)


@dataclass
class Fault:
    path: str
    method: str | None
    status: int | None
    body: Any
    times: int | None
    delay: float
    hang: bool
    drop: bool
    retry_after: Any
    content_type: str
    after_effect: bool | None
    skip: int = 0  # matching requests let through untouched before the fault applies
    hits: int = 0

    def matches(self, rec: RecordedRequest) -> bool:
        return rec.path.startswith(self.path) and self.method in (None, rec.method)

    def effect_first(self, rec: RecordedRequest) -> bool:
        if self.after_effect is not None:
            return self.after_effect
        # Token endpoint default: the grant is committed, then the answer is late or lost.
        return (
            rec.path == "/oauth2/access_token" and not self.status and not self.hang and (self.drop or self.delay > 0)
        )

    def response(self) -> Response:
        if self.body is None:
            status, headers, body = problem(self.status)
        elif isinstance(self.body, (bytes, str)):
            body = self.body.encode() if isinstance(self.body, str) else self.body
            status, headers = self.status, {"Content-Type": self.content_type}
        else:
            status, headers, body = _json(self.status, self.body, self.content_type)
        if self.retry_after is not None:
            headers = {**headers, "Retry-After": str(self.retry_after)}
        return status, headers, body


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for keep-alive or hanging handlers
    request_queue_size = 128
    allow_reuse_address = True
    fake: FakeAmo

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # clients hanging up are not errors
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length
    server_version = "nginx"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, add=False)

    def do_GET(self) -> None:
        self.server.fake._handle(self)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def date_time_string(self, timestamp: Any = None) -> str:  # the Date header, off by ``date_offset``
        if timestamp is None:
            timestamp = time.time() + self.server.fake.date_offset
        return super().date_time_string(timestamp)


# (method, path regex, handler method, needs a bearer token). A trailing slash is tolerated.
ROUTES = [
    ("POST", r"/oauth2/access_token", "_h_token", False),
    ("GET", r"/oauth2/account/current/subdomain", "_h_subdomain", False),
    ("GET", r"/api/v4/account", "_h_account", True),
    ("GET", r"/api/v4/leads/pipelines", "_h_pipelines", True),
    ("GET", r"/api/v4/leads/custom_fields", "_h_custom_fields", True),
    ("GET", r"/api/v4/leads/notes", "_h_notes", True),
    ("POST", r"/api/v4/leads/notes", "_h_notes_create", True),
    ("GET", r"/api/v4/leads/(\d+)", "_h_lead", True),
    ("GET", r"/api/v4/leads", "_h_leads", True),
    ("PATCH", r"/api/v4/leads", "_h_leads_patch", True),
    ("GET", r"/api/v4/events", "_h_events", True),
    ("GET", r"/api/v4/events/([0-9a-z]+)", "_h_event", True),
    ("GET", r"/api/v4/webhooks", "_h_webhooks", True),
    ("POST", r"/api/v4/webhooks", "_h_webhooks_subscribe", True),
    ("DELETE", r"/api/v4/webhooks", "_h_webhooks_delete", True),
    ("GET", r"/api/v4/users", "_h_users", True),
    ("GET", r"/api/v4/tasks", "_h_tasks", True),
    ("POST", r"/api/v4/tasks", "_h_tasks_create", True),
    ("GET", r"/api/v4/tasks/(\d+)", "_h_task", True),
]
ROUTES = [(m, re.compile(p + "/?"), h, a) for m, p, h, a in ROUTES]


class FakeAmo:
    max_batch = 50  # most tasks per POST /api/v4/tasks (UNCERTAIN in the real API)
    max_limit = 250  # most items per page
    max_webhooks = 100  # subscriptions per account (crm_platform/webhooks-api)
    max_target: int | None = None  # longest request target served; longer ones get nginx's 414

    def __init__(
        self,
        *,
        subdomain: str = "example",
        account_id: int = 1231414,
        client_id: str = "client-id-123",
        client_secret: str = "client-secret-456",
        redirect_uri: str = "https://hooks.example.com/oauth/callback",
        access_ttl: float = 86400,
        code_ttl: float = 1200,
        refresh_ttl: float = 90 * 86400,
        rate_limit: int | None = 7,
        timezone: str = "Europe/Moscow",
        clock: Callable[[], float] = time.time,
        rate_clock: Callable[[], float] = time.monotonic,
        events_seed: int = 0,
    ):
        self.subdomain, self.account_id = subdomain, account_id
        self.client_id, self.client_secret, self.redirect_uri = client_id, client_secret, redirect_uri
        self.access_ttl, self.code_ttl, self.refresh_ttl = access_ttl, code_ttl, refresh_ttl
        self.rate_limit, self.timezone = rate_limit, timezone
        self._clock, self._rate_clock = clock, rate_clock
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self.base_url: str | None = None
        # OAuth state
        self._codes: dict[str, dict] = {}
        self._access: dict[str, dict] = {}
        self._refresh: dict[str, dict] = {}
        self.refresh_calls = self.code_calls = 0
        # traffic and faults
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []  # tracebacks of bugs inside the fake (answered 500)
        self.count_429 = 0
        self._faults: list[Fault] = []
        self._blocked = self._block_oauth = False
        self._admitted: list[float] = []
        # events log and webhook subscriptions
        self.events: list[dict] = []  # unspecified order; internal key "visible_at"
        self._events_rng = random.Random(events_seed)
        self._event_ids: set[str] = set()
        self._note_id = 42743871
        self.webhooks: list[dict] = []
        self._webhook_id = 839655
        self.reenable_on_repost = True  # does re-POSTing a destination clear `disabled`? (undocumented)
        self.date_offset = 0.0  # seconds added to the Date header: a server clock that is off
        self._seed()

    # ---------------------------------------------------------------- seed data
    def _seed(self) -> None:
        acc = _load("account_with_task_types.json")
        embedded = acc.pop("_embedded")
        acc.pop("_links")
        acc.update(id=self.account_id, subdomain=self.subdomain, name=self.subdomain)
        self.account: dict = acc
        self.account_embedded: dict = {k: embedded[k] for k in ("amojo_rights", "users_groups")}
        self.task_types: list[dict] = embedded["task_types"]
        self.users: list[dict] = []
        self._rights_template = _load("users_list.json")["_embedded"]["users"][1]["rights"]
        self.add_user("Администратор", "admin@example.com", user_id=acc["current_user_id"], is_admin=True)
        self.add_user("Менеджер", "manager@example.com", user_id=123123)
        self.pipelines: list[dict] = []
        for p in _load("pipelines_list.json")["_embedded"]["pipelines"]:
            p.pop("_links")
            p["account_id"] = self.account_id
            for s in p["_embedded"]["statuses"]:
                s.pop("_links")
                s["account_id"] = self.account_id
            self.pipelines.append(p)
        self.custom_fields: list[dict] = []
        self.add_custom_field("Комментарий", "textarea")
        self.leads: dict[int, dict] = {}
        lead = _load("lead_get_by_id.json")
        self.add_lead(
            lead["name"],
            3177727,
            32392159,
            acc["current_user_id"],
            lead_id=lead["id"],
            price=lead["price"],
            created_at=lead["created_at"],
            updated_at=lead["updated_at"],
            _embedded={"tags": lead["_embedded"]["tags"], "companies": []},
        )
        self.tasks: dict[int, dict] = {}
        self.patched_hooks: list[tuple[str, dict]] = []  # (leads action, hook item) per PATCHed change
        self.notes: dict[int, dict] = {}  # lead notes (POST/GET /api/v4/leads/notes)

    @staticmethod
    def _new_id(taken: Any, floor: int) -> int:
        return max([floor, *taken]) + 1

    def add_pipeline(self, name: str, stages: list[str], pipeline_id: int | None = None) -> dict:
        """A pipeline with the system statuses: unsorted (type 1) first, then ``stages``, then
        142 and 143 (same ids in every pipeline). Appended to ``pipelines`` and returned."""
        with self._lock:
            pid = pipeline_id or self._new_id((p["id"] for p in self.pipelines), 3177727)
            taken = [s["id"] for p in self.pipelines for s in p["_embedded"]["statuses"] if s["id"] > 143]
            next_sid = self._new_id(taken, 32392165)

            def status(sid: int, sname: str, sort: int, editable: bool, color: str, stype: int = 0) -> dict:
                return {
                    "id": sid,
                    "name": sname,
                    "sort": sort,
                    "is_editable": editable,
                    "pipeline_id": pid,
                    "color": color,
                    "type": stype,
                    "account_id": self.account_id,
                }

            statuses = [status(next_sid, "Неразобранное", 10, False, "#c1c1c1", 1)]
            statuses += [status(next_sid + i, s, 10 * (i + 1), True, "#99ccff") for i, s in enumerate(stages, 1)]
            statuses += [
                status(142, "Успешно реализовано", 10000, False, "#CCFF66"),
                status(143, "Закрыто и не реализовано", 11000, False, "#D5D8DB"),
            ]
            pipeline = {
                "id": pid,
                "name": name,
                "sort": len(self.pipelines) + 1,
                "is_main": not self.pipelines,
                "is_unsorted_on": True,
                "is_archive": False,
                "account_id": self.account_id,
                "_embedded": {"statuses": statuses},
            }
            self.pipelines.append(pipeline)
            return pipeline

    def add_user(self, name: str, email: str | None = None, user_id: int | None = None, is_admin: bool = False) -> dict:
        with self._lock:
            uid = user_id or self._new_id((u["id"] for u in self.users), 600000)
            rights = copy.deepcopy(self._rights_template)
            rights.update(is_admin=is_admin, status_rights=None, group_id=None, role_id=None)
            user = {"id": uid, "name": name, "email": email or f"user{uid}@example.com", "lang": "ru", "rights": rights}
            self.users.append(user)
            return user

    def add_task_type(self, name: str, code: str | None = None, type_id: int | None = None) -> dict:
        with self._lock:
            tid = type_id or self._new_id((t["id"] for t in self.task_types), 2136270)
            task_type = {"id": tid, "name": name, "color": None, "icon_id": None, "code": code}
            self.task_types.append(task_type)
            return task_type

    def add_custom_field(
        self, name: str, field_type: str = "text", field_id: int | None = None, enums: list[str] | None = None
    ) -> dict:
        with self._lock:
            fid = field_id or self._new_id((f["id"] for f in self.custom_fields), 1000000)
            options = [{"id": fid * 10 + i, "value": v, "sort": i} for i, v in enumerate(enums)] if enums else None
            cf = {
                "id": fid,
                "name": name,
                "type": field_type,
                "account_id": self.account_id,
                "code": None,
                "sort": 500 + len(self.custom_fields),
                "is_api_only": False,
                "enums": options,
                "group_id": None,
                "required_statuses": [],
                "is_deletable": True,
                "is_predefined": False,
                "entity_type": "leads",
                "remind": None,
                "settings": None,
            }
            self.custom_fields.append(cf)
            return cf

    def add_lead(
        self,
        name: str,
        pipeline_id: int,
        status_id: int,
        responsible_user_id: int,
        lead_id: int | None = None,
        **fields: Any,
    ) -> dict:
        """A lead in API v4 shape; ``fields`` override or add keys (e.g. custom_fields_values)."""
        with self._lock:
            lid = lead_id or self._new_id(self.leads, 3912171)
            now = int(self._clock())
            lead = {
                "id": lid,
                "name": name,
                "price": 0,
                "responsible_user_id": responsible_user_id,
                "group_id": 0,
                "status_id": status_id,
                "pipeline_id": pipeline_id,
                "loss_reason_id": None,
                "created_by": 0,
                "updated_by": 0,
                "created_at": now,
                "updated_at": now,
                "closed_at": None,
                "closest_task_at": None,
                "is_deleted": False,
                "custom_fields_values": None,
                "score": None,
                "account_id": self.account_id,
                "_embedded": {"tags": [], "companies": []},
            }
            lead.update(fields)
            self.leads[lid] = lead
            return lead

    # ---------------------------------------------------------------- events log and lead changes
    def _base(self) -> str:
        return self.base_url or f"https://{self.subdomain}.amocrm.ru"

    def _event_id(self, created_at: int) -> str:
        """A 26-char lowercase ULID-like id: 10 Crockford base32 chars of created_at*1000 ms (as the
        documented id 01pz58t6p0… decodes), then 16 random ones."""
        ms = int(created_at) * 1000
        head = "".join(CROCKFORD[(ms >> (5 * (9 - i))) & 31] for i in range(10))
        while True:
            eid = head + "".join(self._events_rng.choice(CROCKFORD) for _ in range(16))
            if eid not in self._event_ids:
                self._event_ids.add(eid)
                return eid

    def add_event(
        self,
        event_type: str,
        entity_id: int,
        *,
        value_after: list | None = None,
        value_before: list | None = None,
        created_by: int | None = None,
        at: float | None = None,
        entity_type: str = "lead",
        log_delay: float = 0.0,
    ) -> dict:
        """Write one event to the log at a random position; listed once ``clock() >= visible_at``."""
        with self._lock:
            created_at = int(self._clock() if at is None else at)
            eid = self._event_id(created_at)
            plural = ENTITY_PLURAL.get(entity_type, entity_type)
            event = {
                "id": eid,
                "type": event_type,
                "entity_id": entity_id,
                "entity_type": entity_type,
                "created_by": self.account["current_user_id"] if created_by is None else created_by,
                "created_at": created_at,
                "value_after": value_after or [],
                "value_before": value_before or [],
                "account_id": self.account_id,
                "_links": {"self": {"href": f"{self._base()}/api/v4/events/{eid}"}},
                "_embedded": {
                    "entity": {
                        "id": entity_id,
                        "_links": {"self": {"href": f"{self._base()}/api/v4/{plural}/{entity_id}"}},
                    }
                },
                "visible_at": self._clock() + log_delay,
            }
            self.events.insert(self._events_rng.randint(0, len(self.events)), event)
            return event

    def _hook_item(self, lead: dict, modified_by: int, **old: Any) -> dict:
        """A lead as a webhook block carries it: API v2 names, every value a string."""
        item = {
            "id": lead["id"],
            "name": lead["name"],
            "status_id": lead["status_id"],
            "price": lead.get("price") if lead.get("price") is not None else "",
            "responsible_user_id": lead["responsible_user_id"],
            "last_modified": lead["updated_at"],
            "modified_user_id": modified_by,
            "created_user_id": lead.get("created_by") or 0,
            "date_create": lead["created_at"],
            "pipeline_id": lead["pipeline_id"],
            "account_id": self.account_id,
        }
        tags = ((lead.get("_embedded") or {}).get("tags")) or []
        if tags:
            item["tags"] = [{"id": t.get("id"), "name": t.get("name")} for t in tags]
        item.update(created_at=lead["created_at"], updated_at=lead["updated_at"], **old)
        return _strings(item)

    def move_lead(
        self,
        lead_id: int,
        status_id: int,
        pipeline_id: int | None = None,
        *,
        user_id: int | None = None,
        at: float | None = None,
        log: bool = True,
        log_delay: float = 0.0,
        log_offset: int = 0,
    ) -> dict:
        """Move a lead to another stage; returns its ``leads[status][0]`` webhook item.

        ``log``: write a lead_status_changed event (created_at = at + log_offset, listed after
        ``log_delay`` seconds of ``clock``); ``log=False`` is a change the log never shows.
        """
        with self._lock:
            lead = self.leads[lead_id]
            at = int(self._clock() if at is None else at)
            user = self.account["current_user_id"] if user_id is None else user_id
            old_status, old_pipeline = lead["status_id"], lead["pipeline_id"]
            new_pipeline = old_pipeline if pipeline_id is None else pipeline_id
            lead.update(status_id=status_id, pipeline_id=new_pipeline, updated_at=at, updated_by=user)
            if status_id in (142, 143):
                lead["closed_at"] = at
            if log:
                self.add_event(
                    "lead_status_changed",
                    lead_id,
                    created_by=user,
                    at=at + log_offset,
                    log_delay=log_delay,
                    value_before=[{"lead_status": {"id": old_status, "pipeline_id": old_pipeline}}],
                    value_after=[{"lead_status": {"id": status_id, "pipeline_id": new_pipeline}}],
                )
            return self._hook_item(lead, user, old_status_id=old_status)

    def create_lead(
        self,
        name: str,
        pipeline_id: int,
        status_id: int,
        responsible_user_id: int,
        *,
        at: float | None = None,
        log: bool = True,
        log_delay: float = 0.0,
        user_id: int | None = None,
    ) -> tuple[dict, dict]:
        """Create a lead as a user would; returns (lead, its ``leads[add][0]`` webhook item). The
        lead_added event carries only a note id, as documented."""
        with self._lock:
            at = int(self._clock() if at is None else at)
            user = self.account["current_user_id"] if user_id is None else user_id
            lead = self.add_lead(
                name,
                pipeline_id,
                status_id,
                responsible_user_id,
                created_at=at,
                updated_at=at,
                created_by=user,
                updated_by=user,
            )
            if log:
                self._note_id += 1
                self.add_event(
                    "lead_added",
                    lead["id"],
                    created_by=user,
                    at=at,
                    log_delay=log_delay,
                    value_after=[{"note": {"id": self._note_id}}],
                    value_before=[],
                )
            return lead, self._hook_item(lead, user)

    def change_responsible(
        self,
        lead_id: int,
        user_id: int,
        *,
        at: float | None = None,
        log: bool = True,
        log_delay: float = 0.0,
        by: int | None = None,
    ) -> dict:
        """Give a lead another responsible user; returns its ``leads[responsible][0]`` webhook item."""
        with self._lock:
            lead = self.leads[lead_id]
            at = int(self._clock() if at is None else at)
            actor = self.account["current_user_id"] if by is None else by
            old = lead["responsible_user_id"]
            lead.update(responsible_user_id=user_id, updated_at=at, updated_by=actor)
            if log:
                self.add_event(
                    "entity_responsible_changed",
                    lead_id,
                    created_by=actor,
                    at=at,
                    log_delay=log_delay,
                    value_before=[{"responsible_user": {"id": old}}],
                    value_after=[{"responsible_user": {"id": user_id}}],
                )
            return self._hook_item(lead, actor, old_responsible_user_id=old)

    def complete_task(
        self, task_id: int, *, at: float | None = None, result: str | None = None, log: bool = True
    ) -> dict:
        """Complete a task as a user would; returns its ``task[update][0]`` webhook item (with
        ``action_close=1``, crm_platform/webhooks-format) and logs task_completed."""
        with self._lock:
            task = self.tasks[task_id]
            at = int(self._clock() if at is None else at)
            task.update(is_completed=True, updated_at=at, result={"text": result} if result else [])
            if log:
                self.add_event("task_completed", task_id, entity_type="task", at=at)
            element_type = {"leads": 2, "contacts": 1, "companies": 3, "customers": 12}.get(task.get("entity_type"), 0)
            item = {
                "id": task_id,
                "element_id": task.get("entity_id") or 0,
                "element_type": element_type,
                "task_type": task.get("task_type_id"),
                "date_create": task["created_at"],
                "text": task.get("text") or "",
                "status": 1,
                "account_id": self.account_id,
                "created_user_id": task.get("created_by"),
                "last_modified": at,
                "responsible_user_id": task.get("responsible_user_id"),
                "complete_till": task.get("complete_till"),
                "action_close": 1,
            }
            if result:
                item["result"] = {"text": result}
            return _strings(item)

    def webhook_body(self, action: str, items: list[dict], entity: str = "leads") -> bytes:
        """An application/x-www-form-urlencoded webhook body as amoCRM sends it today: the account
        first (subdomain, id, link), then ``{entity}[{action}][i][field]=…`` with PHP bracket keys."""
        pairs = [
            ("account[subdomain]", self.subdomain),
            ("account[id]", str(self.account_id)),
            ("account[_links][self]", f"https://{self.subdomain}.amocrm.ru"),
        ]
        for index, item in enumerate(items):
            _flatten(f"{entity}[{action}][{index}]", item, pairs)
        return urlencode(pairs).encode()

    # ---------------------------------------------------------------- webhook subscriptions
    def add_webhook(
        self,
        destination: str,
        settings: list[str],
        *,
        disabled: bool = False,
        sort: int | None = None,
        created_by: int | None = None,
    ) -> dict:
        """A subscription as if made in amoCRM's settings (no request)."""
        with self._lock:
            now = int(self._clock())
            self._webhook_id = self._new_id((h["id"] for h in self.webhooks), self._webhook_id)  # never reused
            hook = {
                "id": self._webhook_id,
                "destination": destination,
                "created_at": now,
                "updated_at": now,
                "account_id": self.account_id,
                "created_by": self.account["current_user_id"] if created_by is None else created_by,
                "sort": len(self.webhooks) + 1 if sort is None else sort,
                "disabled": disabled,
                "settings": list(settings),
            }
            self.webhooks.append(hook)
            return hook

    def disable_webhook(self, destination: str) -> dict:
        """amoCRM switches the subscription of exactly ``destination`` off (after failed deliveries)."""
        with self._lock:
            hook = self._webhook(destination)
            if hook is None:
                raise KeyError(destination)
            hook["disabled"] = True
            return hook

    def _webhook(self, destination: Any) -> dict | None:
        return next((h for h in self.webhooks if h["destination"] == destination), None)

    # ---------------------------------------------------------------- OAuth helpers
    def _mint(self, expires_in: float, admin: bool, user_id: int | None, refresh: bool) -> tuple[str, str | None]:
        now = self._clock()
        uid = user_id or self.account["current_user_id"]
        jti = secrets.token_hex(20)
        header = {"typ": "JWT", "alg": "RS256", "jti": jti}
        claims = {
            "aud": self.client_id,
            "jti": jti,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + expires_in),
            "sub": str(uid),
            "grant_type": "",
            "account_id": self.account_id,
            "base_domain": "amocrm.ru",
            "version": 2,
            "scopes": ["crm", "notifications"],
            "hash_uuid": str(uuid.uuid4()),
            "api_domain": urlsplit(self.base_url or "").netloc,
        }
        access = ".".join(
            [_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(secrets.token_bytes(256))]
        )
        self._access[access] = {"exp": now + expires_in, "admin": admin, "user_id": uid, "revoked": False}
        if not refresh:
            return access, None
        token = "def50200" + secrets.token_hex(350)
        self._refresh[token] = {
            "exp": now + self.refresh_ttl,
            "admin": admin,
            "user_id": uid,
            "used": False,
            "revoked": False,
        }
        return access, token

    def issue_code(self, ttl: float | None = None, admin: bool = True, user_id: int | None = None) -> str:
        """A single-use authorization code (as shown in the integration's "Ключи" tab)."""
        with self._lock:
            code = "def50200" + secrets.token_hex(200)
            ttl = self.code_ttl if ttl is None else ttl
            self._codes[code] = {"exp": self._clock() + ttl, "used": False, "admin": admin, "user_id": user_id}
            return code

    def issue_tokens(
        self, expires_in: float | None = None, admin: bool = True, user_id: int | None = None
    ) -> tuple[str, str]:
        """A valid (access, refresh) pair, as if init-auth had happened."""
        with self._lock:
            return self._mint(self.access_ttl if expires_in is None else expires_in, admin, user_id, True)

    def issue_long_lived_token(self, expires_in: float = 5 * 365 * 86400, admin: bool = True) -> str:
        with self._lock:
            return self._mint(expires_in, admin, None, refresh=False)[0]

    def revoke_all(self) -> None:
        """The integration was disabled: every access and refresh token stops working."""
        with self._lock:
            for info in [*self._access.values(), *self._refresh.values()]:
                info["revoked"] = True

    def expire_access_tokens(self) -> None:
        """Every access token issued so far is expired (tokens issued later are fine)."""
        with self._lock:
            now = self._clock()
            for info in self._access.values():
                info["exp"] = min(info["exp"], now - 1)

    def token_state(self, token: str) -> str:
        """'valid', 'expired', 'revoked', 'used' (spent refresh token) or 'unknown'."""
        with self._lock:
            info = self._access.get(token) or self._refresh.get(token)
            if info is None:
                return "unknown"
            if info["revoked"]:
                return "revoked"
            if info.get("used"):
                return "used"
            return "expired" if info["exp"] <= self._clock() else "valid"

    def set_clock_behind(self, seconds: float) -> None:
        """amoCRM's clock runs ``seconds`` behind this host's (a host clock that is fast): the Date
        header and every time amoCRM stamps — events, tasks, tokens, ``server_time`` — follow it."""
        with self._lock:
            base = self._clock
            self._clock = lambda: base() - seconds
            self.date_offset -= seconds

    # ---------------------------------------------------------------- faults and inspection
    def fail(
        self,
        path: str,
        status: int | None = None,
        body: Any = None,
        times: int | None = 1,
        delay: float = 0.0,
        hang: bool = False,
        drop: bool = False,
        retry_after: Any = None,
        content_type: str = PROBLEM,
        after_effect: bool | None = None,
        method: str | None = None,
        skip: int = 0,
    ) -> Fault:
        """Program a fault for requests whose path starts with ``path`` (and of ``method``); the
        first ``skip`` of them are answered normally (a fault mid-sequence: the second POST)."""
        if status is None and not (delay or hang or drop):
            status = 500  # a bare fail(path) is a server error; `delay` alone only delays
        fault = Fault(
            path, method, status, body, times, delay, hang, drop, retry_after, content_type, after_effect, skip
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def block(self, on: bool = True, include_oauth: bool = False) -> None:
        """amoCRM's ban: /api/ (and with include_oauth the token endpoint) answer 403 nginx HTML."""
        with self._lock:
            self._blocked, self._block_oauth = on, on and include_oauth

    def requests_to(self, path_prefix: str, method: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith(path_prefix) and method in (None, r.method)]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()
            self.count_429 = 0

    def max_in_window(self, window: float = 1.0, path_prefix: str = "/api/") -> int:
        """The most recorded arrivals (refused or not) within any ``window`` seconds of rate_clock."""
        times = sorted(r.mono for r in self.requests_to(path_prefix))
        best = start = 0
        for end, t in enumerate(times):
            while t - times[start] >= window:
                start += 1
            best = max(best, end - start + 1)
        return best

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> FakeAmo:
        if self._server is None:
            self._stopping.clear()
            self._server = _Server(("127.0.0.1", 0), _Handler)
            self._server.fake = self
            self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="FakeAmo", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; hanging/delayed handlers are released, open connections are cut."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> FakeAmo:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    # ---------------------------------------------------------------- request pipeline
    def _handle(self, h: _Handler) -> None:
        rec = self._record(h)
        with self._lock:
            fault = next((f for f in self._faults if f.matches(rec)), None)
            if fault is not None and fault.skip > 0:
                fault.skip -= 1
                fault = None
            if fault is not None:
                fault.hits += 1
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
        response = None
        if fault is not None and fault.effect_first(rec):
            response = self._respond(rec)
        if fault is not None:
            rec.fault = "delay"
            if fault.delay and self._stopping.wait(fault.delay):
                return self._cut(h)
            if fault.drop or fault.hang:
                rec.fault = "drop" if fault.drop else "hang"
                if fault.hang:
                    self._stopping.wait()
                return self._cut(h)
            if fault.status:
                rec.fault = "status"
                response = fault.response()
        self._send(h, rec, response or self._respond(rec))

    def _record(self, h: _Handler) -> RecordedRequest:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        url = urlsplit(h.path)
        headers = Headers(h.headers.items())
        data = form = None
        if "x-www-form-urlencoded" in headers.get("Content-Type", ""):
            form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        elif body:
            try:
                data = json.loads(body)
            except ValueError:
                pass
        rec = RecordedRequest(
            h.command,
            url.path,
            parse_qs(url.query, keep_blank_values=True),
            headers,
            body,
            data,
            form,
            self._clock(),
            self._rate_clock(),
            *h.client_address[:2],
            target=h.path,
        )
        with self._lock:
            self.requests.append(rec)
            if rec.method == "POST" and rec.path == "/oauth2/access_token":
                grant = self._params(rec).get("grant_type")
                self.refresh_calls += grant == "refresh_token"
                self.code_calls += grant == "authorization_code"
        return rec

    def _respond(self, rec: RecordedRequest) -> Response:
        """Decide the answer and perform the effect (under the lock)."""
        with self._lock:
            try:
                is_api = rec.path.startswith("/api/")
                if self._blocked and (is_api or (self._block_oauth and rec.path.startswith("/oauth2/"))):
                    return 403, {"Content-Type": "text/html"}, BLOCKED_HTML
                if self.max_target is not None and len(rec.target) > self.max_target:
                    return 414, {"Content-Type": "text/html"}, URI_TOO_LONG_HTML
                if is_api and self.rate_limit is not None:
                    self._admitted = [t for t in self._admitted if rec.mono - t < 1.0]
                    if len(self._admitted) >= self.rate_limit:
                        return problem(429, "Превышено допустимое количество запросов в секунду", "Too Many Requests")
                    self._admitted.append(rec.mono)
                allowed = []
                for method, pattern, name, needs_token in ROUTES:
                    m = pattern.fullmatch(rec.path)
                    if m and method != rec.method:
                        allowed.append(method)
                    elif m:
                        token = None
                        if needs_token and (token := self._bearer(rec)) is None:
                            return problem(401, "Неверный логин или пароль", "Unauthorized")
                        return getattr(self, name)(rec, *m.groups(), token=token)
                if allowed:
                    status, headers, body = problem(405)
                    return status, {**headers, "Allow": ", ".join(allowed)}, body
                return problem(404, f"No route for {rec.path}")
            except Exception:  # a bug in the fake: make it visible, keep serving
                import traceback

                self.errors.append(traceback.format_exc())
                return problem(500, self.errors[-1].splitlines()[-1])

    def _send(self, h: _Handler, rec: RecordedRequest, response: Response) -> None:
        status, headers, body = response
        with self._lock:
            rec.status = status  # set before writing: the client may look right after
            self.count_429 += status == 429
        try:
            h.send_response(status)
            for key, value in headers.items():
                h.send_header(key, value)
            if status == 204:
                body = b""
            else:
                h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if body and h.command != "HEAD":
                h.wfile.write(body)
        except OSError:
            h.close_connection = True

    @staticmethod
    def _cut(h: _Handler) -> None:
        """Close the connection without any answer."""
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _bearer(self, rec: RecordedRequest) -> dict | None:
        scheme, _, token = rec.headers.get("Authorization", "").partition(" ")
        info = self._access.get(token.strip()) if scheme.lower() == "bearer" else None
        if info is None or info["revoked"] or info["exp"] <= self._clock():
            return None
        return info

    @staticmethod
    def _params(rec: RecordedRequest) -> dict:
        return rec.json if isinstance(rec.json, dict) else (rec.form or {})

    @staticmethod
    def _q(rec: RecordedRequest, name: str) -> list[str]:
        """Query values of ``name`` and ``name[]``."""
        return rec.query.get(name, []) + rec.query.get(name + "[]", [])

    def _link(self, path: str) -> dict:
        return {"self": {"href": f"{self.base_url}{path}"}}

    def _page(
        self,
        rec: RecordedRequest,
        key: str,
        items: list[dict],
        totals: bool,
        max_limit: int | None = None,
        over_limit: int | None = None,
        render: Callable[[Any], dict] | None = None,
    ) -> Response:
        """A HAL page of ``items`` by ``page``/``limit``; 204 when the page is empty.

        ``render``: applied to the page's items only (a log of 10,000 events is not rendered whole
        for every page: the benchmarks measure amohook, not the fake).

        ``over_limit``: a ``limit`` above ``max_limit`` is not refused but served as pages of
        ``over_limit`` items without a ``next`` link (amoCRM's events list does this).
        """
        max_limit = max_limit or self.max_limit
        try:
            page = int((self._q(rec, "page") or ["1"])[0])
            limit = int((self._q(rec, "limit") or ["50"])[0])
        except ValueError:
            return problem(400, "page and limit must be integers")
        size, no_next = limit, False
        if over_limit and limit > max_limit:
            size, no_next = over_limit, True
        elif not (1 <= limit <= max_limit) or page < 1:
            return problem(400, f"limit must be 1..{max_limit} and page >= 1")
        if page < 1:
            return problem(400, "page must be >= 1")
        chunk = items[(page - 1) * size : page * size]
        if not chunk:
            return 204, {}, b""
        if render is not None:
            chunk = [render(item) for item in chunk]
        pages = math.ceil(len(items) / size)
        rest = [(k, v) for k, vs in rec.query.items() if k not in ("page", "limit") for v in vs]

        def href(n: int) -> dict:
            return {"href": f"{self.base_url}{rec.path}?" + urlencode(rest + [("limit", limit), ("page", n)])}

        links = {"self": href(page)}
        if page < pages and not no_next:
            links["next"] = href(page + 1)
        if page > 1:
            links.update(first=href(1), prev=href(page - 1))
        body: dict = {"_page": page, "_links": links, "_embedded": {key: chunk}}
        if totals:
            body = {"_total_items": len(items), "_page_count": pages, **body}
        return _json(200, body)

    # ---------------------------------------------------------------- OAuth endpoints
    def _h_token(self, rec: RecordedRequest, token: None) -> Response:
        p = self._params(rec)
        if p.get("client_id") != self.client_id or p.get("client_secret") != self.client_secret:
            return oauth_error(401, "Client authentication failed")
        grant = p.get("grant_type")
        if grant not in ("authorization_code", "refresh_token"):
            return oauth_error(400, "Check the `grant_type` parameter")
        if p.get("redirect_uri") != self.redirect_uri:
            return oauth_error(400, None)
        now = self._clock()
        if grant == "authorization_code":
            code = self._codes.get(p.get("code") or "")
            if code is None:
                return oauth_error(400, "Cannot decrypt the authorization code")
            if code["used"]:
                return oauth_error(400, "Authorization code has been revoked")
            if code["exp"] <= now:
                return oauth_error(400, "Authorization code has expired")
            code["used"] = True
            admin, user_id = code["admin"], code["user_id"]
        else:
            old = self._refresh.get(p.get("refresh_token") or "")
            if old is None or old["used"] or old["revoked"] or old["exp"] <= now:
                return oauth_error(401, "Token has been revoked")
            old["used"] = True  # single use; the old access token stays valid until expiry
            admin, user_id = old["admin"], old["user_id"]
        access, refresh = self._mint(self.access_ttl, admin, user_id, refresh=True)
        return _json(
            200,
            {
                "token_type": "Bearer",
                "expires_in": int(self.access_ttl),
                "server_time": int(now),
                "access_token": access,
                "refresh_token": refresh,
            },
            "application/json",
        )

    def _h_subdomain(self, rec: RecordedRequest, token: None) -> Response:
        info = self._refresh.get(rec.headers.get("X-Refresh-Token", ""))
        if info is None or info["used"] or info["revoked"]:
            return oauth_error(401, "Token has been revoked")
        return _json(
            200,
            {
                "id": self.account_id,
                "subdomain": self.subdomain,
                "domain": f"{self.subdomain}.amocrm.ru",
                "top_level_domain": "ru",
            },
            "application/json",
        )

    # ---------------------------------------------------------------- API v4 endpoints
    def _h_account(self, rec: RecordedRequest, token: dict) -> Response:
        wanted = {w.strip() for v in self._q(rec, "with") for w in v.split(",")}
        body = {k: v for k, v in self.account.items() if k not in ACCOUNT_WITH_TOP or k in wanted}
        body["current_user_id"] = token["user_id"]
        body["_links"] = self._link("/api/v4/account")
        embedded = {
            **self.account_embedded,
            "task_types": self.task_types,
            "datetime_settings": self._datetime_settings(),
        }
        if wanted & set(ACCOUNT_WITH_EMBEDDED):
            body["_embedded"] = {k: embedded[k] for k in ACCOUNT_WITH_EMBEDDED if k in wanted}
        return _json(200, body)

    def _datetime_settings(self) -> dict:
        try:
            from zoneinfo import ZoneInfo

            offset = datetime.now(ZoneInfo(self.timezone)).strftime("%z")
            offset = f"{offset[:3]}:{offset[3:]}"
        except Exception:
            offset = "+00:00"
        return {
            "date_pattern": "d.m.Y H:i",
            "short_date_pattern": "d.m.Y",
            "short_time_pattern": "H:i",
            "date_formant": "d.m.Y",
            "time_format": "H:i:s",
            "timezone": self.timezone,
            "timezone_offset": offset,
        }

    def _render_pipeline(self, p: dict) -> dict:
        path = f"/api/v4/leads/pipelines/{p['id']}"
        statuses = [{**s, "_links": self._link(f"{path}/statuses/{s['id']}")} for s in p["_embedded"]["statuses"]]
        return {**p, "_links": self._link(path), "_embedded": {**p["_embedded"], "statuses": statuses}}

    def _h_pipelines(self, rec: RecordedRequest, token: dict) -> Response:
        return _json(
            200,
            {
                "_total_items": len(self.pipelines),
                "_links": self._link(rec.path),
                "_embedded": {"pipelines": [self._render_pipeline(p) for p in self.pipelines]},
            },
        )

    def _h_custom_fields(self, rec: RecordedRequest, token: dict) -> Response:
        items = [{**f, "_links": self._link(f"/api/v4/leads/custom_fields/{f['id']}")} for f in self.custom_fields]
        return self._page(rec, "custom_fields", items, totals=True)

    def _h_lead(self, rec: RecordedRequest, lid: str, token: dict) -> Response:
        lead = self.leads.get(int(lid))
        if lead is None:
            return 204, {}, b""
        return _json(200, {**lead, "_links": self._link(f"/api/v4/leads/{lead['id']}")})

    def _render_user(self, u: dict) -> dict:
        return {**u, "_links": self._link(f"/api/v4/users/{u['id']}")}

    def _h_users(self, rec: RecordedRequest, token: dict) -> Response:
        if not token["admin"]:
            return problem(403, "Метод доступен только с правами администратора аккаунта", "Forbidden")
        return self._page(rec, "users", [self._render_user(u) for u in self.users], totals=True)

    def _render_task(self, t: dict) -> dict:
        body = {k: v for k, v in t.items() if k != "request_id"}
        return {**body, "_links": self._link(f"/api/v4/tasks/{t['id']}")}

    def _h_tasks(self, rec: RecordedRequest, token: dict) -> Response:
        def wanted(name: str, key: str, conv: Callable = int) -> Callable[[dict], bool]:
            values = {conv(v) for v in self._q(rec, f"filter[{name}]")}
            return lambda t: not values or t.get(key) in values

        checks = [
            wanted("entity_type", "entity_type", str),
            wanted("entity_id", "entity_id"),
            wanted("task_type", "task_type_id"),
            wanted("responsible_user_id", "responsible_user_id"),
            wanted("is_completed", "is_completed", lambda v: v in ("1", "true")),
        ]
        items = [self._render_task(t) for _, t in sorted(self.tasks.items()) if all(c(t) for c in checks)]
        return self._page(rec, "tasks", items, totals=False)

    def _h_task(self, rec: RecordedRequest, tid: str, token: dict) -> Response:
        task = self.tasks.get(int(tid))
        return _json(200, self._render_task(task)) if task else (204, {}, b"")

    def _task_errors(self, item: Any) -> list[dict]:
        def err(code: str, path: str, detail: str) -> dict:
            return {"code": code, "path": path, "detail": detail}

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(item, dict):
            return [err("InvalidType", "", "This value should be of type object.")]
        errors = []
        if not isinstance(item.get("text"), str) or not item["text"].strip():
            errors.append(err("NotBlank", "text", "This value should not be blank."))
        if not is_int(item.get("complete_till")):
            errors.append(err("InvalidType", "complete_till", "This value should be of type int."))
        choices = {
            "task_type_id": {t["id"] for t in self.task_types},
            "responsible_user_id": {u["id"] for u in self.users},
        }
        for key, allowed in choices.items():
            if key in item and item[key] not in allowed:
                errors.append(err("NotSupportedChoice", key, "The value you selected is not a valid choice."))
        if "entity_type" in item or "entity_id" in item:
            if item.get("entity_type") not in ENTITY_TYPES:
                errors.append(err("NotSupportedChoice", "entity_type", "The value you selected is not a valid choice."))
            if not is_int(item.get("entity_id")):
                errors.append(err("InvalidType", "entity_id", "This value should be of type int."))
        return errors

    def _batch(self, rec: RecordedRequest, what: str, empty: str, check: Callable[[Any], list]) -> tuple:
        """(items, request ids, None) for a valid batch POST/PATCH, or (None, None, the 400 answer):
        a non-array, an empty or oversized array, or any invalid item refuses the whole batch."""
        items = rec.json
        if not isinstance(items, list) or not items:
            return None, None, problem(400, empty)
        if len(items) > self.max_batch:
            return None, None, problem(400, f"At most {self.max_batch} {what} per request")
        rids = [str(i.get("request_id", n)) if isinstance(i, dict) else str(n) for n, i in enumerate(items)]
        invalid = [
            {"request_id": rid, "errors": errs} for rid, item in zip(rids, items, strict=True) if (errs := check(item))
        ]
        if invalid:  # the whole batch is refused, nothing is created
            return None, None, problem(400, "Request validation failed", **{"validation-errors": invalid})
        return items, rids, None

    def _h_tasks_create(self, rec: RecordedRequest, token: dict) -> Response:
        items, rids, refused = self._batch(
            rec, "tasks", "The request body must be a non-empty JSON array", self._task_errors
        )
        if refused:
            return refused
        now, created = int(self._clock()), []
        for rid, item in zip(rids, items, strict=True):
            tid = self._new_id(self.tasks, 4745250)
            self.tasks[tid] = {
                "id": tid,
                "created_by": token["user_id"],
                "updated_by": token["user_id"],
                "created_at": now,
                "updated_at": now,
                "responsible_user_id": token["user_id"],
                "group_id": 0,
                "entity_id": None,
                "entity_type": None,
                "duration": 0,
                "is_completed": False,
                "task_type_id": 1,
                "result": [],
                "account_id": self.account_id,
                **item,
            } | {"id": tid, "request_id": item.get("request_id")}
            created.append({"id": tid, "request_id": rid, "_links": self._link(f"/api/v4/tasks/{tid}")})
        return _json(200, {"_links": self._link("/api/v4/tasks"), "_embedded": {"tasks": created}})

    # ---------------------------------------------------------------- lead notes
    NOTE_TYPES = ("common", "call_in", "call_out", "service_message", "extended_service_message", "sms_in", "sms_out")

    def _h_notes(self, rec: RecordedRequest, token: dict) -> Response:
        ids = {int(v) for v in self._q(rec, "filter[entity_id]")}
        types = set(self._q(rec, "filter[note_type]"))
        items = [
            {
                **{k: v for k, v in n.items() if k != "request_id"},
                "_links": self._link(f"/api/v4/leads/notes/{n['id']}"),
            }
            for _, n in sorted(self.notes.items())
            if (not ids or n["entity_id"] in ids) and (not types or n["note_type"] in types)
        ]
        return self._page(rec, "notes", items, totals=False)

    def _h_notes_create(self, rec: RecordedRequest, token: dict) -> Response:
        """POST /api/v4/leads/notes: an array of notes; like tasks, one invalid item refuses all."""
        items = rec.json
        if not isinstance(items, list) or not items:
            return problem(400, "The request body must be a non-empty JSON array")
        if len(items) > self.max_batch:
            return problem(400, f"At most {self.max_batch} notes per request")
        rids = [str(i.get("request_id", n)) if isinstance(i, dict) else str(n) for n, i in enumerate(items)]
        invalid = []
        for rid, item in zip(rids, items, strict=True):
            errors = []
            if not isinstance(item, dict) or not isinstance(item.get("entity_id"), int):
                errors.append(
                    {"code": "NotSupportedChoice", "path": "entity_id", "detail": "entity_id must be an integer"}
                )
            elif item.get("note_type") not in self.NOTE_TYPES:
                errors.append({"code": "NotSupportedChoice", "path": "note_type", "detail": "unknown note_type"})
            elif item["note_type"] == "common" and not ((item.get("params") or {}).get("text") or "").strip():
                errors.append({"code": "NotBlank", "path": "params.text", "detail": "This value should not be blank."})
            if errors:
                invalid.append({"request_id": rid, "errors": errors})
        if invalid:
            return problem(400, "Request validation failed", **{"validation-errors": invalid})
        now, created = int(self._clock()), []
        for rid, item in zip(rids, items, strict=True):
            nid = self._new_id(self.notes, 76610421)
            self.notes[nid] = {
                "id": nid,
                "entity_id": item["entity_id"],
                "created_by": token["user_id"],
                "updated_by": token["user_id"],
                "created_at": now,
                "updated_at": now,
                "responsible_user_id": token["user_id"],
                "group_id": 0,
                "note_type": item["note_type"],
                "params": item.get("params") or {},
                "account_id": self.account_id,
                "request_id": item.get("request_id"),
            }
            created.append(
                {
                    "id": nid,
                    "entity_id": item["entity_id"],
                    "request_id": rid,
                    "_links": self._link(f"/api/v4/leads/notes/{nid}"),
                }
            )
        return _json(200, {"_links": self._link("/api/v4/leads/notes"), "_embedded": {"notes": created}})

    # ---------------------------------------------------------------- leads list, events log, webhooks
    @staticmethod
    def _multi(rec: RecordedRequest, name: str) -> list[str]:
        """Values of ``name``, ``name[]`` and ``name[0]``…, comma-separated ones split."""
        pattern = re.compile(re.escape(name) + r"(\[\d*\])?")
        return [
            part.strip()
            for key, values in rec.query.items()
            if pattern.fullmatch(key)
            for value in values
            for part in value.split(",")
            if part.strip()
        ]

    def _h_leads(self, rec: RecordedRequest, token: dict) -> Response:
        """GET /api/v4/leads: ``filter[id]`` and ``filter[statuses][N][pipeline_id|status_id]`` pairs
        (crm_platform/filters-api: a stage is a (pipeline, status) pair; a pair missing either half
        is refused, as the ids 142/143 exist in every pipeline)."""
        try:
            ids = {int(v) for v in self._multi(rec, "filter[id]")}
        except ValueError:
            return problem(400, "filter[id] must be lead ids")
        pairs: dict[str, dict[str, int]] = {}
        for key, values in rec.query.items():
            m = re.fullmatch(r"filter\[statuses\]\[(\d+)\]\[(pipeline_id|status_id)\]", key)
            if m:
                try:
                    pairs.setdefault(m.group(1), {})[m.group(2)] = int(values[0])
                except ValueError:
                    return problem(400, "filter[statuses] takes pipeline and status ids")
        if any(len(pair) != 2 for pair in pairs.values()):
            return problem(400, "filter[statuses][N] needs both pipeline_id and status_id")
        stages = {(pair["pipeline_id"], pair["status_id"]) for pair in pairs.values()}
        items = [
            lead
            for lid, lead in sorted(self.leads.items())
            if (not ids or lid in ids)
            and (not stages or (lead["pipeline_id"], lead["status_id"]) in stages)
            and not lead.get("is_deleted")
        ]
        return self._page(
            rec,
            "leads",
            items,
            totals=False,
            render=lambda lead: {**lead, "_links": self._link(f"/api/v4/leads/{lead['id']}")},
        )

    def _lead_patch_errors(self, item: Any) -> list[dict]:
        def err(code: str, path: str, detail: str) -> dict:
            return {"code": code, "path": path, "detail": detail}

        if not isinstance(item, dict) or not isinstance(item.get("id"), int) or item["id"] not in self.leads:
            return [err("NotSupportedChoice", "id", "The value you selected is not a valid choice.")]
        errors = []
        if "status_id" in item or "pipeline_id" in item:
            pipeline = next(
                (
                    p
                    for p in self.pipelines
                    if p["id"] == item.get("pipeline_id", self.leads[item["id"]]["pipeline_id"])
                ),
                None,
            )
            statuses = {st["id"]: st for st in (pipeline or {}).get("_embedded", {}).get("statuses", [])}
            status = statuses.get(item.get("status_id"))
            if pipeline is None:
                errors.append(err("NotSupportedChoice", "pipeline_id", "The value you selected is not a valid choice."))
            elif status is None or status.get("type") == 1:  # unknown, or the unsorted stage (amocrm-api-php#156)
                errors.append(err("NotSupportedChoice", "status_id", "The value you selected is not a valid choice."))
        fields = {f["id"]: f for f in self.custom_fields}
        for n, cf in enumerate(item.get("custom_fields_values") or []):
            field = fields.get(cf.get("field_id")) if isinstance(cf, dict) else None
            if field is None:
                errors.append(
                    err(
                        "NotSupportedChoice",
                        f"custom_fields_values.{n}.field_id",
                        "The value you selected is not a valid choice.",
                    )
                )
                continue
            for m, value in enumerate(cf.get("values") or []):
                if field["enums"] and value.get("value") not in {e["value"] for e in field["enums"]}:
                    errors.append(
                        err(
                            "NotSupportedChoice",
                            f"custom_fields_values.{n}.values.{m}.value",
                            "The value you selected is not a valid choice.",
                        )
                    )
        if "_embedded" in item and ("tags_to_add" in item or "tags_to_delete" in item):
            pass  # amoCRM lets _embedded.tags win silently (amocrm-api-php MutateTagsTrait); so does the fake
        return errors

    def _h_leads_patch(self, rec: RecordedRequest, token: dict) -> Response:
        """PATCH /api/v4/leads: an array of {id, …}; like tasks, one invalid item refuses all. A move
        goes through ``move_lead`` (its lead_status_changed event is logged); the hook item each
        change would send is kept in ``patched_hooks`` as (action, item)."""
        items, rids, refused = self._batch(rec, "leads", "Request data can not be empty", self._lead_patch_errors)
        if refused:
            return refused
        now, changed = int(self._clock()), []
        for item in items:
            lead = self.leads[item["id"]]
            if "status_id" in item and (item["status_id"], item.get("pipeline_id", lead["pipeline_id"])) != (
                lead["status_id"],
                lead["pipeline_id"],
            ):
                self.patched_hooks.append(
                    (
                        "status",
                        self.move_lead(
                            lead["id"], item["status_id"], item.get("pipeline_id"), user_id=token["user_id"], at=now
                        ),
                    )
                )
            values = {cf["field_id"]: cf for cf in lead.get("custom_fields_values") or []}
            for cf in item.get("custom_fields_values") or []:
                field = next(f for f in self.custom_fields if f["id"] == cf["field_id"])
                values[cf["field_id"]] = {
                    "field_id": cf["field_id"],
                    "field_name": field["name"],
                    "field_code": None,
                    "field_type": field["type"],
                    "values": cf.get("values"),
                }
            if item.get("custom_fields_values"):
                lead["custom_fields_values"] = [v for v in values.values() if v["values"]] or None
            tags = lead.setdefault("_embedded", {}).setdefault("tags", [])
            for tag in item.get("tags_to_add") or []:
                if tag.get("name") and all(t["name"] != tag["name"] for t in tags):
                    tags.append(
                        {"id": self._new_id((t["id"] for t in tags), 500000), "name": tag["name"], "color": None}
                    )
            lead.update(updated_at=now, updated_by=token["user_id"])
            if "status_id" not in item:
                self.patched_hooks.append(("update", self._hook_item(lead, token["user_id"])))
            changed.append({"id": lead["id"], "updated_at": now, "_links": self._link(f"/api/v4/leads/{lead['id']}")})
        return _json(200, {"_links": self._link("/api/v4/leads"), "_embedded": {"leads": changed}})

    def _render_event(self, event: dict) -> dict:
        body = {k: v for k, v in event.items() if k != "visible_at"}
        body["_links"] = self._link(f"/api/v4/events/{event['id']}")
        plural = ENTITY_PLURAL.get(event.get("entity_type"), event.get("entity_type"))
        body["_embedded"] = {
            "entity": {"id": event.get("entity_id"), "_links": self._link(f"/api/v4/{plural}/{event.get('entity_id')}")}
        }
        return body

    def _visible(self, event: dict) -> bool:
        return event.get("visible_at", float("-inf")) <= self._clock()

    def _h_events(self, rec: RecordedRequest, token: dict) -> Response:
        """GET /api/v4/events: any user's token; filters type, created_at, entity, entity_id, id."""
        types = set(self._multi(rec, "filter[type]"))
        entities = set(self._multi(rec, "filter[entity]"))
        ids = set(self._multi(rec, "filter[id]"))
        try:
            entity_ids = {int(v) for v in self._multi(rec, "filter[entity_id]")}
            low = rec.query.get("filter[created_at][from]", [None])[0]
            high = rec.query.get("filter[created_at][to]", [None])[0]
            single = self._multi(rec, "filter[created_at]")
            if single:  # one timestamp: created after it; two (old form "from,to"): a range
                low, high = (single + [high])[:2] if len(single) == 1 else single[:2]
            low = int(low) if low not in (None, "") else None
            high = int(high) if high not in (None, "") else None
        except ValueError:
            return problem(400, "filter values must be integers where amoCRM expects ids or timestamps")
        if entity_ids and len(entities) != 1:
            return problem(400, "filter[entity_id] needs exactly one filter[entity]")
        if len(entity_ids) > 10:
            return problem(400, "filter[entity_id] takes at most 10 ids")

        def wanted(e: dict) -> bool:
            return (
                self._visible(e)
                and (not types or e["type"] in types)
                and (not entities or e["entity_type"] in entities)
                and (not entity_ids or e["entity_id"] in entity_ids)
                and (not ids or e["id"] in ids)
                and (low is None or e["created_at"] >= low)
                and (high is None or e["created_at"] <= high)
            )

        items = [e for e in self.events if wanted(e)]
        return self._page(
            rec,
            "events",
            items,
            totals=False,
            max_limit=EVENT_PAGE_MAX,
            over_limit=EVENT_PAGE_OVER,
            render=self._render_event,
        )

    def _h_event(self, rec: RecordedRequest, eid: str, token: dict) -> Response:
        event = next((e for e in self.events if e["id"] == eid and self._visible(e)), None)
        return _json(200, self._render_event(event)) if event else (204, {}, b"")

    @staticmethod
    def _not_admin() -> Response:
        return problem(403, "Не хватает прав", "Forbidden")

    def _h_webhooks(self, rec: RecordedRequest, token: dict) -> Response:
        if not token["admin"]:
            return self._not_admin()
        wanted = rec.query.get("filter[destination]")
        hooks = [h for h in self.webhooks if wanted is None or h["destination"] == wanted[0]]
        if not hooks:
            return 204, {}, b""
        return _json(200, {"_total_items": len(hooks), "_embedded": {"webhooks": copy.deepcopy(hooks)}})

    def _h_webhooks_subscribe(self, rec: RecordedRequest, token: dict) -> Response:
        if not token["admin"]:
            return self._not_admin()
        body = rec.json
        errors = []
        if not isinstance(body, dict):
            return problem(400, "The request body must be a JSON object")
        destination, settings = body.get("destination"), body.get("settings")
        if not isinstance(destination, str) or not destination.strip():
            errors.append({"code": "NotBlank", "path": "destination", "detail": "This value should not be blank."})
        if not isinstance(settings, list) or not settings:
            errors.append({"code": "NotBlank", "path": "settings", "detail": "This value should not be blank."})
        elif any(s not in WEBHOOK_EVENTS for s in settings):
            errors.append(
                {
                    "code": "NotSupportedChoice",
                    "path": "settings",
                    "detail": "The value you selected is not a valid choice.",
                }
            )
        if errors:
            return problem(400, "Request validation failed", **{"validation-errors": [{"errors": errors}]})
        hook = self._webhook(destination)
        if hook is not None:  # documented: an existing destination is updated with the settings
            hook.update(settings=list(settings), updated_at=int(self._clock()))
            if isinstance(body.get("sort"), int):
                hook["sort"] = body["sort"]
            if self.reenable_on_repost:
                hook["disabled"] = False
            return _json(200, copy.deepcopy(hook))
        if len(self.webhooks) >= self.max_webhooks:
            return problem(400, f"At most {self.max_webhooks} webhooks per account")
        hook = self.add_webhook(
            destination,
            settings,
            created_by=token["user_id"],
            sort=body["sort"] if isinstance(body.get("sort"), int) else None,
        )
        return _json(201, copy.deepcopy(hook))

    def _h_webhooks_delete(self, rec: RecordedRequest, token: dict) -> Response:
        if not token["admin"]:
            return self._not_admin()
        destination = rec.json.get("destination") if isinstance(rec.json, dict) else None
        if not isinstance(destination, str) or not destination:
            return problem(400, "destination is required")
        hook = self._webhook(destination)
        if hook is None:
            return problem(404, "Webhook not found", "Not Found")
        self.webhooks.remove(hook)
        return 204, {}, b""
