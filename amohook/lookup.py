"""Resolve what people write ("stage Qualified of pipeline Sales", "task type Call", "anna@x.ru")
to the rows `sync-entities` stored, and explain a miss with the closest names.

Matching, in order: a numeric id (an ``int``, or a string of digits that is an id); the exact
name; the name ignoring case, repeated spaces and ё/е. Two rows matching at the same step is an
``Ambiguous`` error that lists their ids, never a guess. Comparison happens in Python, not SQL,
so MySQL's case-insensitive collations do not make one backend match what another would not.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Iterable, Sequence

from amohook.errors import ConfigError
from amohook.store.models import Account, CustomField, Pipeline, Stage, TaskType, User

# amoCRM's system statuses have the same ids in every pipeline (FACTS.md §4) and localized,
# renameable names, so rules may also call them by role.
STAGE_ALIASES = {"won": 142, "lost": 143}
MAX_SUGGESTIONS = 3
SUGGESTION_CUTOFF = 0.6


class LookupFailed(ConfigError):
    """A name or id in a rule or option does not resolve; the message says what would."""


class NotFound(LookupFailed):
    def __init__(self, kind: str, given: Any, suggestions: Sequence[str] = (), *, where: str = "", hint: str = ""):
        self.kind = kind
        self.given = given
        self.suggestions = list(suggestions)
        self.where = where
        place = f" {where}" if where else ""
        if self.suggestions:
            tail = f" — did you mean {_either(self.suggestions)}?"
        else:
            tail = f" — {hint}" if hint else ""
        super().__init__(f"no {kind} '{given}'{place}{tail}")


class Ambiguous(LookupFailed):
    def __init__(self, kind: str, given: Any, matches: Sequence[tuple[int, str]], *, where: str = ""):
        self.kind = kind
        self.given = given
        self.matches = sorted(matches)
        place = f" {where}" if where else ""
        listed = ", ".join(f"{name} (id {amo_id})" for amo_id, name in self.matches)
        super().__init__(f"{len(self.matches)} {kind}s{place} match '{given}': {listed} — use the id")


def _either(names: Sequence[str]) -> str:
    quoted = [f"'{n}'" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def normalize(text: str) -> str:
    """Case, runs of whitespace and ё/е do not tell names apart."""
    return re.sub(r"\s+", " ", str(text)).strip().casefold().replace("ё", "е")


def _subdomain(account: str | Account) -> str:
    return account.subdomain if isinstance(account, Account) else str(account)


def _as_id(given: Any) -> int | None:
    if isinstance(given, bool):
        return None
    if isinstance(given, int):
        return given
    if isinstance(given, str) and given.strip().isdigit():
        return int(given.strip())
    return None


def _resolve(
    kind: str,
    given: Any,
    rows: list,
    names: Callable[[Any], tuple],
    *,
    where: str,
    empty_hint: str,
    miss_hint: str,
    aliases: dict[str, int] | None = None,
):
    """The one row ``given`` names among ``rows``; ``names(row)`` gives the names a row answers to."""
    if not rows:
        raise NotFound(kind, given, where=where, hint=empty_hint)
    wanted_id = _as_id(given)
    if wanted_id is not None:
        by_id = [r for r in rows if r.amo_id == wanted_id]
        if by_id:
            return by_id[0]
        if not isinstance(given, str):
            raise NotFound(kind, given, where=where, hint=miss_hint)
    text = str(given).strip()
    for same in (lambda a, b: a == b, lambda a, b: normalize(a) == normalize(b)):
        hits = [r for r in rows if any(n is not None and same(n, text) for n in names(r))]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise Ambiguous(kind, given, [(r.amo_id, r.name) for r in hits], where=where)
    if aliases and normalize(text) in aliases:
        alias = [r for r in rows if r.amo_id == aliases[normalize(text)]]
        if alias:
            return alias[0]
    raise NotFound(kind, given, suggest(text, [n for r in rows for n in names(r) if n]), where=where, hint=miss_hint)


def suggest(given: str, names: Iterable[str], n: int = MAX_SUGGESTIONS) -> list[str]:
    """The known names closest to ``given`` (difflib, ignoring case), best first."""
    by_norm: dict[str, str] = {}
    for name in names:
        by_norm.setdefault(normalize(name), name)
    close = difflib.get_close_matches(normalize(given), list(by_norm), n=n, cutoff=SUGGESTION_CUTOFF)
    return [by_norm[c] for c in close]


def _sync_hint(sub: str, what: str) -> str:
    return f"no {what} are stored yet: run `amohook sync-entities --subdomain {sub}`"


def find_pipeline(account: str | Account, name_or_id: Any) -> Pipeline:
    """The pipeline named or numbered ``name_or_id``."""
    sub = _subdomain(account)
    rows = list(Pipeline.select().where(Pipeline.account == sub).order_by(Pipeline.sort, Pipeline.amo_id))
    return _resolve(
        "pipeline", name_or_id, rows, lambda r: (r.name,),
        where=f"in account '{sub}'",
        empty_hint=_sync_hint(sub, "pipelines"),
        miss_hint=f"`amohook pipelines --subdomain {sub}` lists them (run `amohook sync-entities` if it is new)",
    )


def find_stage(account: str | Account, pipeline: Pipeline | Any, name_or_id: Any) -> Stage:
    """The stage (status) ``name_or_id`` of ``pipeline`` (a Pipeline, or its name or id).

    Also answers to "won" and "lost" (ids 142 and 143, whatever they are called in the account).
    """
    sub = _subdomain(account)
    if not isinstance(pipeline, Pipeline):
        pipeline = find_pipeline(sub, pipeline)
    rows = list(
        Stage.select()
        .where((Stage.account == sub) & (Stage.pipeline_id == pipeline.amo_id))
        .order_by(Stage.sort, Stage.amo_id)
    )
    return _resolve(
        "stage", name_or_id, rows, lambda r: (r.name,),
        where=f"in pipeline '{pipeline.name}'",
        empty_hint=_sync_hint(sub, "stages"),
        miss_hint=f"`amohook pipelines --subdomain {sub}` lists the stages of every pipeline",
        aliases=STAGE_ALIASES,
    )


def find_task_type(account: str | Account, name_or_id: Any) -> TaskType:
    """The task type by id, name, or code (FOLLOW_UP, MEETING)."""
    sub = _subdomain(account)
    rows = list(TaskType.select().where(TaskType.account == sub).order_by(TaskType.amo_id))
    return _resolve(
        "task type", name_or_id, rows, lambda r: (r.name, r.code),
        where=f"in account '{sub}'",
        empty_hint=_sync_hint(sub, "task types"),
        miss_hint=f"`amohook task-types --subdomain {sub}` lists them",
    )


def find_user(account: str | Account, name_email_or_id: Any) -> User:
    """The user by id, e-mail or name (inactive users too: check ``is_active`` if it matters)."""
    sub = _subdomain(account)
    rows = list(User.select().where(User.account == sub).order_by(User.amo_id))
    return _resolve(
        "user", name_email_or_id, rows, lambda r: (r.name, r.email),
        where=f"in account '{sub}'",
        empty_hint=_sync_hint(sub, "users") + " (with an admin's token: GET /api/v4/users needs admin rights)",
        miss_hint=f"`amohook users --subdomain {sub}` lists them",
    )


def find_custom_field(account: str | Account, name_or_id: Any, entity_type: str = "leads") -> CustomField:
    """The custom field of ``entity_type`` (only lead fields are synced) by id, name or code."""
    sub = _subdomain(account)
    rows = list(
        CustomField.select()
        .where((CustomField.account == sub) & (CustomField.entity_type == entity_type))
        .order_by(CustomField.sort, CustomField.amo_id)
    )
    return _resolve(
        f"{entity_type[:-1] if entity_type.endswith('s') else entity_type} custom field", name_or_id, rows,
        lambda r: (r.name, r.code),
        where=f"in account '{sub}'",
        empty_hint=_sync_hint(sub, "custom fields"),
        miss_hint="check the field's name in amoCRM (run `amohook sync-entities` if it is new)",
    )
