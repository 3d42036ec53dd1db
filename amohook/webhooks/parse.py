"""Turn an amoCRM webhook body into events, without any I/O.

amoCRM POSTs ``application/x-www-form-urlencoded`` bodies with PHP-style bracket keys
(``leads[status][0][id]=...``) in the API v2 shape, every value a string (docs/amocrm.md §5 "Transport",
§7.1, §7.3). That encoding is PHP's own, so a form body is read exactly as PHP reads ``$_POST``
(https://www.php.net/manual/en/language.variables.external.php): a body PHP accepts is never
refused for its shape. The body comes from the open internet, so every limit is checked before
anything big is built, and every refusal is a ``BodyRejected`` with a short reason, never a
traceback.
"""

from __future__ import annotations

import json
import re
from binascii import a2b_qp
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from amohook.errors import AmohookError

__all__ = [
    "MAX_DEPTH",
    "MAX_FORM_DEPTH",
    "MAX_FIELDS",
    "BodyRejected",
    "ParsedWebhook",
    "UnsupportedMediaType",
    "WebhookEvent",
    "extract_events",
    "parse_body",
    "parse_form",
    "parse_json",
    "parse_webhook",
    "to_lists",
]

MAX_FIELDS = 10_000
MAX_DEPTH = 32  # JSON bodies
# PHP's max_input_nesting_level (default 64): a form key with more bracket groups is dropped, with
# everything already stored under its name, as PHP drops it.
MAX_FORM_DEPTH = 64

FORM_TYPE = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"


class BodyRejected(AmohookError):
    """The body cannot be read as a webhook; the HTTP layer answers ``status`` with ``reason``."""

    status = 400

    def __init__(self, reason: str):
        super().__init__(f"webhook body rejected: {reason}")
        self.reason = reason


class UnsupportedMediaType(BodyRejected):
    """The Content-Type is neither form nor JSON (amoCRM always sends form, docs/amocrm.md §5)."""

    status = 415


# --- form bodies -------------------------------------------------------------------------------

# A field is a maximal run without '&'; empty runs ("a=1&&b=2") are not fields.
_FIELD = re.compile(r"[^&]+")
# PHP's integer array keys: the decimal form of a signed 64-bit integer, without leading zeros or
# '+' ("-0" and "01" stay strings). `[]` appends after the largest of them.
_PHP_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,18})")
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


def parse_form(body: bytes, *, max_fields: int = MAX_FIELDS, max_depth: int = MAX_FORM_DEPTH) -> dict:
    """Parse a form body with PHP bracket keys into nested dicts with string keys, as PHP would.

    ``a[b][0][c]=x`` becomes ``{"a": {"b": {"0": {"c": "x"}}}}``; ``a[]`` appends at the next
    integer key; blank values are kept; the last write wins, also where a name was a value before
    and is a container now, or the other way round. ``_php_name`` says how names are read.
    """
    text = _decode_utf8(body)
    # Count before building: '&' count is a free upper bound; only when it is over the limit are
    # the non-empty fields counted, and that count stops at the first field too many.
    if text.count("&") >= max_fields:
        for count, _ in enumerate(_FIELD.finditer(text), 1):
            if count > max_fields:
                raise BodyRejected(f"more than {max_fields} fields")
    root: dict = {}
    # id(container) -> (container, the key `[]` appends at next), once `[]` was used there; the
    # container is held so that its id is not reused by another while the parse runs.
    appends: dict[int, tuple[dict, int]] = {}
    for key, value in _fields(body, text):
        plain = _PLAIN.fullmatch(key)
        if plain is not None and "__" not in key and key.count("[") <= max_depth:
            # The usual name (leads[status][0][id]), which PHP reads as written: no need for the
            # rules below.
            base, brackets = plain.groups()
            if not brackets:
                parts = [base]
            else:
                parts = [base, *brackets[1:-1].split("][")]
                if "" in parts:
                    parts = [p if p else None for p in parts]
            _insert(root, parts, value, appends)
            continue
        name = _php_name(key, max_depth)
        if name is not None:
            _insert(root, name.parts, value, appends, too_deep=name.too_deep, guarded=name.guarded)
    return root


# A name PHP reads as written: a base of letters, digits, '_' and '-', then `[index]` groups whose
# index neither starts with whitespace nor holds a bracket or NUL.
_PLAIN = re.compile(r"([0-9A-Za-z_\-]+)((?:\[(?:[^\[\]\s\x00][^\[\]\x00]*)?\])*)")


@dataclass(frozen=True)
class _Name:
    parts: list  # the base name, then each index (None for `[]`)
    too_deep: bool  # more than max_depth bracket groups: PHP drops the variable after walking them
    guarded: tuple  # prefixes a part may not start with (see _GUARDED_PREFIXES)


# PHP 8 drops a variable at a part that starts with one of these when the name as sent did not
# (CVE-2022-31629: mangling must not make a cookie-like "__Host-" name).
_GUARDED_PREFIXES = ("__Host-", "__Secure-")


def _php_name(key: str, max_depth: int) -> _Name | None:
    """How PHP 8 reads a variable name (main/php_variables.c, php_register_variable_ex).

    None when PHP ignores the variable. The rules: the name ends at a NUL; leading spaces are
    dropped; in the base name (before the first '['), spaces and dots become '_'; an empty base
    name is ignored; an index runs from '[' to the next ']' (so it may hold '['), and ``[]`` or
    '[' + one whitespace character + ']' appends; after a ']' anything but '[' ends the name
    (``a[b]c`` is ``a[b]``); a first '[' without a ']' is no index but a '_' in a plain name (and
    the rest of it is mangled like the base: ``a[b.c`` is ``a_b_c``); a later one ends the name
    (``a[b][c`` is ``a[b]``). PHP counts the groups before reading each, so the group after the
    ``max_depth``-th makes the variable too deep even when it is unterminated.
    """
    if "\x00" in key:
        key = key[: key.index("\x00")]
    key = key.lstrip(" ")
    # Only a name holding '_' (or what mangling turns into one) can give a guarded part.
    mangled = "_" in key or "." in key or " " in key or "[" in key
    guarded = tuple(p for p in _GUARDED_PREFIXES if not key.startswith(p)) if mangled else ()
    open_at = key.find("[")
    base = (key if open_at < 0 else key[:open_at]).replace(" ", "_").replace(".", "_")
    if not base:
        return None
    if open_at < 0:
        return _Name([base], False, guarded)
    parts: list[str | None] = [base]
    while True:
        if len(parts) > max_depth:  # checked before each group is read, like PHP's nesting level
            return _Name(parts[:-1], True, guarded)
        start = open_at + 1
        # One whitespace character right after '[' is skipped when looking for `[]`: `[ ]` appends.
        skip = 1 if key[start : start + 1] in _BLANKS else 0
        close = key.find("]", start + skip)
        if close < 0:
            if len(parts) > 1:
                return _Name(parts, False, guarded)
            rest = key[start:].replace(" ", "_").replace(".", "_").replace("[", "_")
            return _Name([base + "_" + rest], False, guarded)
        parts.append(None if close == start + skip else key[start:close])
        if not key.startswith("[", close + 1):
            return _Name(parts, False, guarded)
        open_at = close + 1


_BLANKS = frozenset(" \t\n\v\f\r")  # C's isspace()


def _insert(root: dict, parts: list, value: str, appends: dict, *, too_deep: bool = False, guarded: tuple = ()) -> None:
    """Store ``value`` at ``parts`` as PHP does: what is in the way is replaced in its place (a
    value by a new container, a container by the value); a ``[]`` with no key left (the largest
    is PHP_INT_MAX) or a guarded part drops the variable from there on, keeping the containers
    made on the way; a name too deep is walked, then its base removed with all it holds."""
    node = root
    last = -1 if too_deep else len(parts) - 1
    for depth, part in enumerate(parts):
        if part is None:  # `[]`: append at the next integer key of this container
            part = _append_key(node, appends)
            if part is None:
                return
        else:
            if guarded and part.startswith(guarded):
                return
            if appends and id(node) in appends and _is_int(part):
                container, after = appends[id(node)]
                appends[id(node)] = (container, max(after, int(part) + 1))
        if depth == last:
            node[part] = value
            return
        child = node.get(part)
        if type(child) is not dict:
            child = node[part] = {}
        node = child
    root.pop(parts[0], None)  # too deep


def _append_key(node: dict, appends: dict) -> str | None:
    """PHP's `[]`: one more than the largest integer key so far (0 if none), as a key; None when
    the largest is PHP_INT_MAX.

    Keys are never removed from a container, so the largest is found by one scan of its keys the
    first time `[]` is used on it, and kept up to date from then on.
    """
    if id(node) in appends:
        _, index = appends[id(node)]
    else:
        index = max((int(k) + 1 for k in node if _is_int(k)), default=0)
    if index > _INT_MAX:
        appends[id(node)] = (node, index)
        return None
    appends[id(node)] = (node, index + 1)
    return str(index)


def _is_int(key: str) -> bool:
    return _PHP_INT.fullmatch(key) is not None and key != "-0" and _INT_MIN <= int(key) <= _INT_MAX


# A '%' that does not start an escape, or the escape of NUL (the separator of the fast path).
_ODD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})|%00")


def _fields(body: bytes, text: str) -> list[tuple[str, str]]:
    """The non-empty fields as percent-decoded (key, value).

    As PHP does, escapes are decoded to bytes; the bytes are then read as UTF-8, and what is not
    UTF-8 (a note cut in the middle of a character) becomes U+FFFD, so that such a body is kept
    and processed rather than refused (a refusal counts toward amoCRM switching the webhook off).

    Percent-decoding key by key costs a Python loop per escape, and a body of bracket keys has
    dozens of escapes per field. Instead, the raw keys and values are joined with NUL (when the
    body has neither a NUL nor "%00", so a NUL after decoding can only be a separator) and decoded
    in one C call: ``binascii.a2b_qp`` with the body's own '=' written "=3D" and every '%' turned
    into '=' — when every '%' starts an escape, every '=' is then followed by two hex digits, and
    quoted-printable decoding is exactly percent-decoding. UTF-8's replacement never takes an
    ASCII byte into a bad sequence, so decoding the whole gives what decoding each key and value
    gives. Any other body is decoded field by field.
    """
    if "%" not in text:
        return _split_fields(text.replace("+", " ") if "+" in text else text)
    raw = bytes(body)
    if b"\x00" not in raw and _ODD_PERCENT.search(raw) is None:
        parts: list[bytes] = []
        for field in raw.split(b"&"):
            if field:  # empty runs ("a=1&&b=2") are not fields
                key, _, value = field.partition(b"=")  # no '=': a blank value, like parse_qsl
                parts += (key, value)
        joined = b"\x00".join(parts).replace(b"+", b" ").replace(b"=", b"=3D").replace(b"%", b"=")
        decoded = a2b_qp(joined).decode("utf-8", "replace").split("\x00")
        pairs = iter(decoded)
        return list(zip(pairs, pairs, strict=False))  # pairs; a lone last key is dropped
    fields = []
    for field in raw.replace(b"+", b" ").split(b"&"):
        if field:
            key, _, value = field.partition(b"=")
            fields.append((_unquote(key), _unquote(value)))
    return fields


def _split_fields(text: str) -> list[tuple[str, str]]:
    fields = []
    for field in text.split("&"):
        if field:  # empty runs ("a=1&&b=2") are not fields
            key, _, value = field.partition("=")  # no '=': a blank value, like parse_qsl
            fields.append((key, value))
    return fields


def _decode_utf8(body: bytes) -> str:
    """The body as text; bytes that are not UTF-8 become U+FFFD (PHP takes any bytes)."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise TypeError(f"body must be bytes, not {type(body).__name__}")
    return bytes(body).decode("utf-8", "replace")


def _unquote(raw: bytes) -> str:
    return unquote_to_bytes(raw).decode("utf-8", "replace")


def _short(text: str, limit: int = 60) -> str:
    """Quote client-supplied text for a reason, cut so a huge key cannot bloat logs/responses."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return repr(text)


def to_lists(tree: object) -> object:
    """Return a copy where every dict keyed exactly "0".."n-1" is a list in index order.

    Form bodies cannot say "list", so ``custom_fields[0][values][0][value]`` arrives as dicts; this
    restores the lists the sender meant. Recursive: meant for trees from ``parse_form`` and
    ``parse_json``, whose depth is already limited.
    """
    if isinstance(tree, dict):
        converted = {key: to_lists(value) for key, value in tree.items()}
        size = len(converted)
        # len == size and all of "0".."size-1" present  <=>  the keys are exactly those.
        if size and all(str(i) in converted for i in range(size)):
            return [converted[str(i)] for i in range(size)]
        return converted
    if isinstance(tree, list):
        return [to_lists(value) for value in tree]
    return tree


# --- JSON bodies -------------------------------------------------------------------------------


def parse_json(body: bytes, *, max_depth: int = MAX_DEPTH) -> dict:
    """Parse a JSON object body (no NaN/Infinity) with the same depth limit as forms; bytes that are
    not UTF-8 become U+FFFD, as in form bodies.

    Depth counts containers below the top-level object, so ``{"a": {"b": 1}}`` has depth 1, like
    the form key ``a[b]``.
    """
    text = _decode_utf8(body)
    try:
        tree = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:  # far deeper than any limit: the C decoder ran out of stack first
        raise BodyRejected(f"nesting deeper than {max_depth}") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise BodyRejected(f"invalid JSON: {exc.msg} at {where}") from None
    except ValueError as exc:  # NaN/Infinity, or an integer too long to convert
        raise BodyRejected(f"invalid JSON: {_short(str(exc))}") from None
    if not isinstance(tree, dict):
        raise BodyRejected(f"JSON top level must be an object, not {_json_kind(tree)}")
    _check_depth(tree, max_depth)
    return tree


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _check_depth(tree: dict, max_depth: int) -> None:
    stack: list[tuple[Any, int]] = [(tree, 0)]
    while stack:  # iterative: a tree just under the interpreter's limit must not overflow here
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > max_depth:
                    raise BodyRejected(f"nesting deeper than {max_depth}")
                stack.append((child, depth + 1))


# --- dispatch ----------------------------------------------------------------------------------


def parse_body(body: bytes, content_type: str | None) -> dict:
    """Parse by media type; parameters such as ``charset`` are ignored (bodies are read as UTF-8)."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    # amoCRM always sends form (docs/amocrm.md §5 "Transport"), so a missing type is read as form.
    if media_type in ("", FORM_TYPE):
        return parse_form(body)
    if media_type == JSON_TYPE or (media_type.startswith("application/") and media_type.endswith("+json")):
        return parse_json(body)
    raise UnsupportedMediaType(f"unsupported content type {_short(media_type)}; expected {FORM_TYPE} or {JSON_TYPE}")


# --- events ------------------------------------------------------------------------------------

# Singular block names amoCRM uses (docs/amocrm.md §5 "Body structure", §7.14: `task`, `message`, `talk`).
_ENTITY_NAMES = {
    "task": "tasks",
    "message": "messages",
    "talk": "talks",
    "contact": "contacts",
    "lead": "leads",
    "company": "companies",
}


@dataclass(frozen=True)
class WebhookEvent:
    """One item of one action of one entity block, e.g. ``leads[status][0]``."""

    entity: str  # normalised plural ("tasks" for the `task` block, "companies" for type=company)
    action: str  # the key under the block, as sent ("add", "status", "note", ...)
    entity_id: str | None
    index: int  # position of the item in its action's list: the i of block[action][i]
    block: str  # the raw top-level key ("task", "contacts", ...)
    data: dict  # the item's fields; {"id": "<value>"} for a bare-id deletion


@dataclass(frozen=True)
class ParsedWebhook:
    account_subdomain: str | None
    account_id: str | None
    events: list[WebhookEvent]
    payload: dict  # the whole tree after to_lists


def parse_webhook(body: bytes, content_type: str | None) -> ParsedWebhook:
    """Body bytes and Content-Type in, events out; raises ``BodyRejected`` for unreadable bodies."""
    return extract_events(parse_body(body, content_type))


def extract_events(payload: dict) -> ParsedWebhook:
    """Find the account and every entity item by structure, never by block name or position.

    The account block moved from last to first between 2023 and 2025 (docs/amocrm.md §5, §7.16), and
    unknown blocks may appear, so every top-level dict except ``account`` is an entity block.
    A payload without items gives no events; whether that is acceptable is the caller's decision.
    """
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, not {type(payload).__name__}")
    # The top level stays a dict even if keyed "0".."n-1": it is the body, not a list.
    tree = {key: to_lists(value) for key, value in payload.items()}
    events: list[WebhookEvent] = []
    for block, actions in tree.items():
        if block == "account" or not isinstance(actions, dict):
            continue  # top-level scalars/lists are not blocks; they stay in the payload
        entity = _ENTITY_NAMES.get(block, block)
        for action, items in actions.items():
            for index, item in enumerate(_items(items)):
                if item is not None:
                    events.append(_event(block, entity, str(action), index, item))

    account = tree.get("account")
    if isinstance(account, dict):
        # 2016 bodies have only account[subdomain]; account[id] since 2020 (docs/amocrm.md §5).
        subdomain = _id_str(account.get("subdomain"))
        account_id = _id_str(account.get("id"))
    else:
        subdomain = None
        account_id = next((found for event in events if (found := _item_account_id(event.data)) is not None), None)
    return ParsedWebhook(subdomain, account_id, events, tree)


def _items(value: object) -> list:
    """The items under one action, in order of appearance."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        # A sparse index map ("0", "2") that to_lists could not turn into a list.
        if value and all(isinstance(k, str) and k.isascii() and k.isdigit() for k in value):
            return list(value.values())
        return [value]  # one item sent without an index (JSON leniency; no capture shows it)
    # {entity: {action: id}} is how the docs describe deletions (docs/amocrm.md §5 "Transport").
    return [value]


def _event(block: str, entity: str, action: str, index: int, item: object) -> WebhookEvent:
    if isinstance(item, dict):
        data = item
    elif isinstance(item, list):
        data = {"value": item}  # nothing in the docs or captures; kept rather than dropped
    else:
        data = {"id": _scalar_str(item)}
    # Companies arrive as contacts[...][type]=company (docs/amocrm.md §5 "Body structure", §7.14).
    if entity == "contacts" and data.get("type") == "company":
        entity = "companies"
    return WebhookEvent(entity, action, _entity_id(entity, data), index, block, data)


def _entity_id(entity: str, data: dict) -> str | None:
    found = _id_str(data.get("id"))
    if found is None:
        note = data.get("note")  # leads[note][i][note][id] (docs/amocrm.md §5 "Body structure")
        if isinstance(note, dict):
            found = _id_str(note.get("id"))
    if found is None and entity == "unsorted":
        found = _id_str(data.get("uid"))
    if found is None and entity == "talks":
        found = _id_str(data.get("talk_id"))
    return found


def _item_account_id(data: dict) -> str | None:
    found = _id_str(data.get("account_id"))
    if found is None and isinstance(data.get("note"), dict):
        found = _id_str(data["note"].get("account_id"))
    return found


def _scalar_str(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _id_str(value: object) -> str | None:
    """Ids as strings (v2 webhooks send strings, JSON may send ints); blank/non-scalar: None."""
    if value is None or isinstance(value, (bool, dict, list)):
        return None
    return _scalar_str(value) or None
