"""``[rule.notify]``: POST a JSON message to a URL (a chat's incoming webhook, an internal system).

The URL is read from the environment variable the rules file names (``url_env``) — never from
the file, and never written to the store or a log: it usually carries a secret. Only https is
accepted, or http to this machine (localhost, 127.0.0.1, ::1). Every string in ``json`` is a
template; the body is bounded. Each message carries an ``Idempotency-Key`` derived from the
action key, so a receiver that honours it sees a retry as the same message: a message whose answer
was lost is sent again with the same key (there is nothing to look up). Failures (timeouts, 5xx,
408, 429) are retried with the sender's backoff; another 4xx refuses the message for good.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests

from amohook.actions.base import ActionKind, PlannedAction, action_key
from amohook.retry import PERSON_WAIT, parse_retry_after
from amohook.rules.template import check_template, render, responsible_of, rule_user, template_values

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
MAX_TEMPLATE_BYTES = 16 * 1024  # the json table as written
MAX_BODY_BYTES = 64 * 1024  # the message as sent, templates filled in
TIMEOUT = (5.0, 15.0)  # connect, read
RETRY_STATUSES = {408, 425, 429}


@dataclass(frozen=True)
class NotifySpec:
    url_env: str
    json: dict = field(compare=False)  # a dict: left out of hashing, so rules stay hashable


def url_problem(url: str) -> str | None:
    """Why this URL is refused, without repeating it (it may hold a secret); None when fine."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        return "is not a URL"
    if not host:
        return "is not a URL (write https://host/path)"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http" and host in LOCAL_HOSTS:
        return None
    return "must be https (plain http only to localhost or 127.0.0.1)"


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
    def send(self, out, client, actions, payloads) -> None:
        for action in out.hold(actions):
            self._post(out, action, payloads[action.id])

    def _post(self, out, action, payload: dict) -> None:
        name = payload["url_env"]
        url = out.env.get(name)
        problem = "is not set" if not url else url_problem(url)
        if problem:  # the environment changed since `rules check`: wait for a person to fix it
            out.later([action], f"the URL in {name} {problem}", maybe_sent=False, wait=PERSON_WAIT, counts=False)
            return
        out.stats.posts += 1
        try:
            response = out.http.post(
                url,
                data=json.dumps(payload["json"], ensure_ascii=False).encode(),
                timeout=TIMEOUT,
                headers={"Content-Type": "application/json", "Idempotency-Key": payload["idempotency_key"]},
                allow_redirects=False,
            )
        except requests.RequestException as exc:  # its text holds the URL: only the kind is said
            out.later([action], f"{type(exc).__name__} while posting to ${name}", maybe_sent=True)
            return
        status = response.status_code
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
                out.fail([action.id], f"${name} refused the message: HTTP {status}", status="rejected")
            out.stats.failed += 1


def idempotency_key(action_key_hex: str) -> str:
    """The header value: derived from the action key, not the key itself (it names no rule)."""
    return hashlib.sha256(f"amohook-notify:{action_key_hex}".encode()).hexdigest()[:40]
