"""Making outside text and secrets safe to show: in the log and on the terminal.

Pure functions (and one logging formatter built on them). Two jobs:

* ``printable`` — text that came from outside (amoCRM names, a request's path, a User-Agent) may
  hold terminal escape sequences; they are shown as ``\\x1b``, never sent to the terminal.
* ``redact_target`` and ``RedactingFormatter`` — a request target near the webhook URL carries the
  secret (or a mistyped one), and nothing may put a token, a code or a secret into the log.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from urllib.parse import unquote

# C0 controls (tab and newline are handled by the caller's choice), DEL, C1 controls, and the
# Unicode controls that reorder or hide text on a terminal (bidi overrides and isolates, line and
# paragraph separators, zero-width joiners at the edges of words are harmless and kept).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_AND_BREAKS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, *, multiline: bool = False) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``); newlines and tabs kept only
    when ``multiline``."""
    text = "" if text is None else str(text)
    return (_CONTROL if multiline else _CONTROL_AND_BREAKS).sub(_escape, text)


_WEBHOOK = re.compile(r"webhooks?", re.IGNORECASE)
_REDACTED = "***"


def _secret_windows(secret: str) -> list[str]:
    """Every 12-character piece of the secret: a path holding one holds a (mistyped) secret."""
    secret = secret.lower()
    width = min(12, len(secret))
    return [secret[i : i + width] for i in range(len(secret) - width + 1)] if secret else []


def redact_target(target: object, secret: str | None = None, *, limit: int = 200) -> str:
    """A request target (path or absolute URL) as it may be logged: percent-decoded, without the
    query, everything after a ``webhook``/``webhooks`` segment (any case) replaced by ``***``, any
    segment holding a piece of the secret replaced too, control characters escaped, cut to ``limit``."""
    text = "" if target is None else str(target)[:70000]
    for _ in range(3):  # %2F, and %252F from a client that encoded twice
        decoded = unquote(text, errors="replace")
        if decoded == text:
            break
        text = decoded
    text = re.split(r"[?#]", text, maxsplit=1)[0]
    match = _WEBHOOK.search(text)
    if match and match.end() < len(text):
        rest = text[match.end() :]
        text = text[: match.end()] + (rest[0] + _REDACTED if rest[0] in "/\\" else _REDACTED)
    if secret:
        windows = _secret_windows(secret)
        parts = re.split(r"([/\\])", text)
        text = "".join(
            _REDACTED if part not in ("/", "\\") and any(w in part.lower() for w in windows) else part for part in parts
        )
    return printable(text)[:limit]


# What amoCRM's secrets look like, in case one reaches a log line by a path nobody foresaw:
# access tokens are JWTs; refresh tokens and authorization codes are long hex strings
# (https://www.amocrm.ru/developers/content/oauth/step-by-step).
_SECRET_PATTERNS = [
    re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
    re.compile(r"(?i)\b(bearer\s+)[^\s'\",]+"),
    re.compile(r"(?i)\b[0-9a-f]{80,}\b"),  # longer than a SHA-256, which the log may show
    re.compile(r"(?i)\b((?:access_token|refresh_token|client_secret)['\"]?\s*[:=]\s*['\"]?)[^\s'\"&,;)]+"),
    re.compile(r"(?i)([?&](?:code|state|client_secret)=)[^&\s'\"]+"),
]


MIN_SECRET_LENGTH = 16  # the webhook secret's least length (the listener refuses a shorter one)
_MIN_HELD = 6  # a shorter value would cut ordinary words out of every line
_MAX_PASSING = 256  # tokens rotate: the newest this many are kept (older ones have expired)


class HeldSecrets:
    """The secrets this process holds, so every log line (a library's too) and every printed
    destination can lose them: whoever reads or receives a secret hands it in (``hold``).

    Lasting ones (the client secret, the webhook secret, a password, a notify URL's path) are
    kept for the life of the process; passing ones (tokens) only the newest ``_MAX_PASSING``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lasting: dict[str, None] = {}
        self._passing: dict[str, None] = {}
        self._patterns: tuple[re.Pattern, re.Pattern] | None = None
        self._empty = True

    def hold(self, *values: object, lasting: bool = True) -> None:
        fresh = [v for v in values if isinstance(v, str) and len(v.strip()) >= _MIN_HELD]
        if not fresh:
            return
        with self._lock:
            changed = False
            for value in fresh:
                if value in self._lasting or value in self._passing:
                    continue
                (self._lasting if lasting else self._passing)[value] = None
                changed = True
            while len(self._passing) > _MAX_PASSING:
                del self._passing[next(iter(self._passing))]
            if changed:
                self._patterns = None
                self._empty = False

    def values(self) -> list[str]:
        with self._lock:
            return [*self._lasting, *self._passing]

    def patterns(self) -> tuple[re.Pattern, re.Pattern] | None:
        """A quick test — any held value's first ``_MIN_HELD`` characters (tokens share theirs, so
        it stays short) — and one alternation of every held value, longest first (a secret holding
        another is cut whole), run only on a line that passes the test."""
        if self._empty:
            return None
        with self._lock:
            if self._patterns is None:
                values = sorted({*self._lasting, *self._passing}, key=len, reverse=True)
                starts = sorted({v[:_MIN_HELD].lower() for v in values})
                self._patterns = (
                    re.compile("|".join(re.escape(v) for v in starts), re.IGNORECASE),
                    re.compile("|".join(re.escape(v) for v in values), re.IGNORECASE),
                )
            return self._patterns

    def forget_all(self) -> None:
        """Tests only: a process that starts over."""
        with self._lock:
            self._lasting.clear()
            self._passing.clear()
            self._patterns = None
            self._empty = True


HELD = HeldSecrets()


def hold_secret(*values: object, lasting: bool = True) -> None:
    """Remember secrets this process holds: no log line and no printed destination shows them."""
    HELD.hold(*values, lasting=lasting)


def redact_secrets(text: str, known: Iterable[str] = (), *, patterns: bool = True) -> str:
    """``text`` without the ``known`` secret values nor those the process holds (in any case), and
    (``patterns``) without anything shaped like a token."""
    for value in known:
        if value:
            text = re.sub(re.escape(value), _REDACTED, text, flags=re.IGNORECASE)
    held = HELD.patterns()
    if held is not None and held[0].search(text):
        text = held[1].sub(_REDACTED, text)
    if patterns:
        for pattern in _SECRET_PATTERNS:
            text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + _REDACTED, text)
    return text


class RedactingFormatter(logging.Formatter):
    """The last guard before a line is written: the finished line (message, exception, stack)
    loses known secrets and token-shaped strings, and control characters are escaped (a log line
    cannot be forged with a newline from outside: tracebacks keep theirs)."""

    def __init__(self, fmt: str | None = None, *, secrets: Iterable[str] = ()):
        super().__init__(fmt)
        self.secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if not record.exc_info and not record.stack_info:
            line = printable(line)
        else:
            line = printable(line, multiline=True)
        return redact_secrets(line, self.secrets)
