"""``[rule.notify]``: POST a JSON message to a URL (a chat's incoming webhook, an internal system).

The URL is read from the environment variable the rules file names (``url_env``) — never from
the file, and never written to the store or a log: it usually carries a secret. Only https is
accepted, or http to this machine (localhost, 127.0.0.1, ::1). Every string in ``json`` is a
template; the body is bounded. Each message carries an ``Idempotency-Key`` derived from the
action key, so a receiver that honours it sees a retry as the same message: a message whose answer
was lost is sent again with the same key (there is nothing to look up). Failures (timeouts, 5xx,
408, 429) are retried with the sender's backoff; another 4xx refuses the message for good.

A receiver is somebody else's server: the whole exchange ends within ``DEADLINE`` however slowly
it answers (``amohook.actions.deadline``), only the status is waited for (a refusal's body is read
up to ``MAX_ANSWER_BYTES`` to explain it), and messages go in a lane of their own
(``ActionKind.lane``), so a slow receiver never holds up what the rules do in amoCRM. A receiver
that gave no answer (timeout, refused connection, deadline) rests ``REST_SECONDS``: its other
messages wait (not counted as attempts), so it cannot hold up the messages to other receivers.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import requests
from requests.models import PreparedRequest
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from amohook.actions.base import ActionKind, PlannedAction, SenderPort, action_key
from amohook.actions.deadline import deadline
from amohook.redact import hold_secret, printable, redact_secrets
from amohook.retry import PERSON_WAIT, parse_retry_after
from amohook.rules.template import check_template, render, responsible_of, rule_user, template_values

if TYPE_CHECKING:
    from amohook.amocrm.client import AmoClient
    from amohook.store.models import Action

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
_ODD = re.compile(r"[\\\s\x00-\x1f\x7f]")
MAX_TEMPLATE_BYTES = 16 * 1024  # the json table as written
MAX_BODY_BYTES = 64 * 1024  # the message as sent, templates filled in
TIMEOUT = (5.0, 15.0)  # connect, and each wait for a byte
DEADLINE = 30.0  # the whole exchange: a receiver trickling bytes cannot hold a message longer
REST_SECONDS = 60.0  # after no answer, a receiver's other messages wait this long (not an attempt)
MAX_ANSWER_BYTES = 4 * 1024  # read of a refusal's answer, to explain it; a success's is not read
RETRY_STATUSES = {408, 425, 429}


@dataclass(frozen=True)
class NotifySpec:
    url_env: str
    json: dict = field(compare=False)  # a dict: left out of hashing, so rules stay hashable


def url_problem(url: str) -> str | None:
    """Why this URL is refused, without repeating it (it may hold a secret); None when fine.

    The URL is read the way requests reads it when it sends (``prepare_url``, urllib3's
    ``parse_url``), so the host checked is the host connected to: ``urlsplit`` and urllib3 disagree
    on ``http://a\\@b/`` (b for one, a for the other). A backslash, a space or a control
    character is refused outright: no correct URL needs one.
    """
    if not isinstance(url, str) or _ODD.search(url):
        return "holds a backslash, a space or a control character — write the URL plainly"
    try:
        prepared = PreparedRequest()
        prepared.prepare_url(url, None)
        parts = parse_url(prepared.url or "")
    except (requests.RequestException, LocationParseError, ValueError):
        return "is not a URL (write https://host/path)"
    host = (parts.host or "").strip("[]").lower()
    if not host:
        return "is not a URL (write https://host/path)"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http" and host in LOCAL_HOSTS:
        return None
    return "must be https (plain http only to localhost or 127.0.0.1)"


def hold_url(url: str) -> None:
    """A receiver's URL usually carries a secret in its path or query: the process holds them
    (``amohook.redact``), so no log line shows them — urllib3's debug log writes the request line.
    Held as written and as requests sends it (percent-encoded): the whole URL, the path with the
    query, the query, any password, and each path segment or query value of 8 characters or more."""
    pieces: list[str | None] = [url]
    forms = [url]
    try:
        prepared = PreparedRequest()
        prepared.prepare_url(url, None)
        forms.append(prepared.url or "")
    except (requests.RequestException, LocationParseError, ValueError):
        pass
    for form in forms:
        try:
            parts = parse_url(form)
        except (LocationParseError, ValueError):
            continue
        pieces += [parts.request_uri if parts.path or parts.query else None, parts.query, parts.auth]
        pieces += (parts.auth or "").split(":", 1)[1:]
        pieces += [p for p in (parts.path or "").split("/") if len(p) >= 8]
        pieces += [v for _, v in parse_qsl(parts.query or "", keep_blank_values=True) if len(v) >= 8]
        pieces += [p for p in (parts.query or "").split("&") if len(p) >= 8]
    hold_secret(*(p for p in pieces if p and p != "/"))


def _templates(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _templates(v, out)
    elif isinstance(value, list):
        for v in value:
            _templates(v, out)


def _fill(value: Any, values: dict) -> Any:
    if isinstance(value, str):
        return render(value, values)
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    if hasattr(value, "isoformat"):  # a TOML date or time: sent as its ISO text
        return value.isoformat()
    return value


class Notify(ActionKind):
    name = "notify"
    noun = "message"
    keys = frozenset({"url_env", "json"})
    key_suffix = "|notify"
    batch_size = 1  # one message per request: every receiver has its own URL and answer
    lane = "notify"  # other servers than amoCRM: a slow one must not hold up amoCRM's actions

    def parse(self, raw, label, problems):
        self.unknown_keys(raw, label, problems)
        url_env = raw.get("url_env")
        if "url" in raw:
            problems.append(
                f"{label}: the URL does not belong in the file — put it in an environment variable "
                'and write url_env = "ITS_NAME"'
            )
        if not isinstance(url_env, str) or not ENV_NAME.match(url_env):
            problems.append(f'{label} needs url_env = "NAME" (the environment variable holding the URL)')
            url_env = ""
        body = raw.get("json")
        if not isinstance(body, dict) or not body:
            problems.append(f"{label} needs json = {{ … }} (the message; string values are templates)")
            body = {}
        elif len(json.dumps(body, default=str).encode()) > MAX_TEMPLATE_BYTES:
            problems.append(f"{label}: json is larger than {MAX_TEMPLATE_BYTES // 1024} KiB")
        texts: list[str] = []
        _templates(body, texts)
        for text in texts:
            for problem in check_template(text):
                problems.append(f"{label} json: {problem}")
        return NotifySpec(url_env=url_env, json=body)

    def compile(self, spec, ctx, label, problems):
        url = ctx.env.get(spec.url_env) if spec.url_env else None
        if not url:
            problems.append(f"{label}: the environment variable {spec.url_env} is not set — export it with the URL")
            return spec
        hold_url(url)
        problem = url_problem(url)
        if problem:
            problems.append(f"{label}: the URL in {spec.url_env} {problem}")
        return spec

    def describe(self, compiled, rule):
        return f"a message to ${compiled.url_env}"

    def summary(self, compiled):
        return {"notify_url_env": compiled.url_env}

    def needs_lead(self, rule, compiled, change):
        from amohook.rules.template import needs_fields, template_fields

        texts: list[str] = []
        _templates(compiled.json, texts)
        fields = {f for t in texts for f in template_fields(t)}
        return needs_fields(change, fields, rule_user(rule))

    def plan(self, rule, compiled, change, ctx):
        key = action_key(rule, change, ctx.fallback, self.key_suffix)
        responsible = responsible_of(rule_user(rule), change, ctx.lead)
        body = _fill(compiled.json, template_values(rule, change, ctx.lead, responsible))
        if len(json.dumps(body, ensure_ascii=False).encode()) > MAX_BODY_BYTES:
            return f"the message for lead {change.lead_id} is larger than {MAX_BODY_BYTES // 1024} KiB; not sent"
        payload = {"url_env": compiled.url_env, "json": body, "idempotency_key": idempotency_key(key)}
        return PlannedAction(
            key=key, rule=rule.name, account=rule.account, lead_id=change.lead_id, payload=payload, kind=self.name
        )

    # A message that may have been sent is sent again under the same Idempotency-Key.
    def send(self, out: SenderPort, client: AmoClient, actions: list[Action], payloads: dict[int, dict]) -> None:
        for action in out.hold(actions):
            self._post(out, action, payloads[action.id])

    def _post(self, out: SenderPort, action: Action, payload: dict) -> None:
        name = payload["url_env"]
        # A receiver (by variable) that gave no answer rests: one slow receiver costs the lane one
        # deadline per REST_SECONDS, not one per message.
        until = out.resting.get(name, 0.0)
        if out.clock() < until:  # not an attempt; it may have been sent before, so "sending"
            message = f"${name} did not answer in time: its messages wait until it has had a rest"
            out.later([action], message, maybe_sent=True, wait=until - out.clock(), counts=False)
            return
        url = out.env.get(name)
        if url:
            hold_url(url)
        problem = "is not set" if not url else url_problem(url)
        if problem or not url:  # the environment changed since `rules check`: wait for a person to fix it
            out.later([action], f"the URL in {name} {problem}", maybe_sent=False, wait=PERSON_WAIT, counts=False)
            return
        out.stats.posts += 1
        # The whole exchange within a deadline; the answer's status decides, its body is read
        # only to explain a refusal, and never more than MAX_ANSWER_BYTES of it.
        with deadline(out.http_deadline) as watch:
            try:
                response = out.http.post(
                    url,
                    data=json.dumps(payload["json"], ensure_ascii=False).encode(),
                    timeout=TIMEOUT,
                    headers={
                        "Content-Type": "application/json",
                        "Idempotency-Key": payload["idempotency_key"],
                        "Accept-Encoding": "identity",  # what is read is what was sent: nothing inflates
                    },
                    allow_redirects=False,
                    stream=True,
                )
            except requests.RequestException as exc:  # its text holds the URL: only the kind is said
                what = f"no answer within {out.http_deadline:g} s" if watch.expired else type(exc).__name__
                out.resting[name] = out.clock() + REST_SECONDS
                out.later([action], f"{what} while posting to ${name}", maybe_sent=True)
                return
            try:
                status = response.status_code
                answer = b"" if 200 <= status < 300 else _answer(response, out)
            finally:
                response.close()
        if 200 <= status < 300:
            with out.store.write():
                out.done(action.id, None, f"${name} answered {status}")
            out.stats.created += 1
        elif status >= 500 or status in RETRY_STATUSES:
            wait = (
                parse_retry_after(response.headers.get("Retry-After"), floor=1.0, cap=3600.0) if status == 429 else None
            )
            out.later([action], f"${name} answered {status}", maybe_sent=True, wait=wait)
        else:
            with out.store.write():
                out.fail([action.id], f"${name} refused the message: HTTP {status}{_reason(answer)}", status="rejected")
            out.stats.failed += 1


def _answer(response: requests.Response, out) -> bytes:
    """At most ``MAX_ANSWER_BYTES`` of the answer, as sent; a failure while reading ends it (the
    status has decided already)."""
    chunks: list[bytes] = []
    size = 0
    try:
        while size < MAX_ANSWER_BYTES:
            chunk = response.raw.read(min(8192, MAX_ANSWER_BYTES - size), decode_content=False)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except Exception:  # noqa: BLE001 — a dropped or deadlined body only loses its explanation
        pass
    out.stats.answer_bytes += size
    return b"".join(chunks)


def _reason(answer: bytes) -> str:
    """The start of a refusal's body, as one printable line without any secret the process holds."""
    text = " ".join(answer.decode("utf-8", "replace").split())[:200]
    return f" — {printable(redact_secrets(text))}" if text else ""


def idempotency_key(action_key_hex: str) -> str:
    """The header value: derived from the action key, not the key itself (it names no rule)."""
    return hashlib.sha256(f"amohook-notify:{action_key_hex}".encode()).hexdigest()[:40]
