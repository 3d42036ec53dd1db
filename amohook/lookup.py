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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from amohook.errors import ConfigError
from amohook.store.models import Account, CustomField, Pipeline, Stage, TaskType, User

# amoCRM's system statuses have the same ids in every pipeline (docs/amocrm.md §4) and localized,
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


class _Index:
    """One table's rows of one account, indexed once by id, name and normalized name.

    `rules check` resolves several names per rule; scanning every row for each (and querying the
    table again) made 20,000 rules take 89 s. The index answers each name in constant time.
    """

    def __init__(self, rows: list, names: Callable[[Any], tuple]):
        self.rows = rows
        self.names = names
        self.by_id: dict[int, Any] = {}
        self.exact: dict[str, list] = {}
        self.loose: dict[str, list] = {}
        for row in rows:
            self.by_id.setdefault(row.amo_id, row)
            for name in {n for n in names(row) if n is not None}:
                self.exact.setdefault(name, []).append(row)
            for norm in {normalize(n) for n in names(row) if n is not None}:
                self.loose.setdefault(norm, []).append(row)


def _resolve(
    kind: str,
    given: Any,
    index: _Index,
    *,
    where: str,
    empty_hint: str,
    miss_hint: str,
    aliases: dict[str, int] | None = None,
):
    """The one row ``given`` names in ``index``: by id, then exact name, then normalized name."""
    if not index.rows:
        raise NotFound(kind, given, where=where, hint=empty_hint)
    wanted_id = _as_id(given)
    if wanted_id is not None:
        if wanted_id in index.by_id:
            return index.by_id[wanted_id]
        if not isinstance(given, str):
            raise NotFound(kind, given, where=where, hint=miss_hint)
    text = str(given).strip()
    for hits in (index.exact.get(text, []), index.loose.get(normalize(text), [])):
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise Ambiguous(kind, given, [(r.amo_id, r.name) for r in hits], where=where)
    if aliases and normalize(text) in aliases and aliases[normalize(text)] in index.by_id:
        return index.by_id[aliases[normalize(text)]]
    names = [n for r in index.rows for n in index.names(r) if n]
    raise NotFound(kind, given, suggest(text, names), where=where, hint=miss_hint)


def suggest(given: str, names: Iterable[str], n: int = MAX_SUGGESTIONS, cutoff: float = SUGGESTION_CUTOFF) -> list[str]:
    """The known names closest to ``given`` (difflib, ignoring case), best first; ``cutoff=0``:
    the closest ones however far."""
    by_norm: dict[str, str] = {}
    for name in names:
        by_norm.setdefault(normalize(name), name)
    close = difflib.get_close_matches(normalize(given), list(by_norm), n=n, cutoff=cutoff)
    return [by_norm[c] for c in close]


def _sync_hint(sub: str, what: str) -> str:
    return f"no {what} are stored yet: run `amohook sync-entities --subdomain {sub}`"


class Catalog:
    """An account's synced pipelines, stages, task types, users and fields, each read once.

    Resolving many names (a rules file) through one catalog costs one query per table, not one
    per name.
    """

    def __init__(self, account: str | Account):
        self.sub = _subdomain(account)
        self._tables: dict[Any, _Index] = {}

    def _index(self, key: Any, load: Callable[[], list], names: Callable[[Any], tuple]) -> _Index:
        if key not in self._tables:
            self._tables[key] = _Index(load(), names)
        return self._tables[key]

    def _pipelines(self) -> _Index:
        return self._index(
            "pipelines",
            lambda: list(
                Pipeline.select().where(Pipeline.account == self.sub).order_by(Pipeline.sort, Pipeline.amo_id)
            ),
            lambda r: (r.name,),
        )

    def _stages(self, pipeline_id: int) -> _Index:
        return self._index(
            ("stages", pipeline_id),
            lambda: list(
                Stage.select()
                .where((Stage.account == self.sub) & (Stage.pipeline_id == pipeline_id))
                .order_by(Stage.sort, Stage.amo_id)
            ),
            lambda r: (r.name,),
        )

    def _task_types(self) -> _Index:
        return self._index(
            "task types",
            lambda: list(TaskType.select().where(TaskType.account == self.sub).order_by(TaskType.amo_id)),
            lambda r: (r.name, r.code),
        )

    def _users(self) -> _Index:
        return self._index(
            "users",
            lambda: list(User.select().where(User.account == self.sub).order_by(User.amo_id)),
            lambda r: (r.name, r.email),
        )

    def _fields(self, entity_type: str) -> _Index:
        return self._index(
            ("fields", entity_type),
            lambda: list(
                CustomField.select()
                .where((CustomField.account == self.sub) & (CustomField.entity_type == entity_type))
                .order_by(CustomField.sort, CustomField.amo_id)
            ),
            lambda r: (r.name, r.code),
        )

    def pipeline(self, name_or_id: Any) -> Pipeline:
        """The pipeline named or numbered ``name_or_id``."""
        sub = self.sub
        return _resolve(
            "pipeline",
            name_or_id,
            self._pipelines(),
            where=f"in account '{sub}'",
            empty_hint=_sync_hint(sub, "pipelines"),
            miss_hint=f"`amohook pipelines --subdomain {sub}` lists them (run `amohook sync-entities` if it is new)",
        )

    def stage(self, pipeline: Pipeline | Any, name_or_id: Any) -> Stage:
        """The stage (status) ``name_or_id`` of ``pipeline`` (a Pipeline, or its name or id).

        Also answers to "won" and "lost" (ids 142 and 143, whatever they are called in the account).
        """
        sub = self.sub
        if not isinstance(pipeline, Pipeline):
            pipeline = self.pipeline(pipeline)
        return _resolve(
            "stage",
            name_or_id,
            self._stages(pipeline.amo_id),
            where=f"in pipeline '{pipeline.name}'",
            empty_hint=_sync_hint(sub, "stages"),
            miss_hint=f"`amohook pipelines --subdomain {sub}` lists the stages of every pipeline",
            aliases=STAGE_ALIASES,
        )

    def task_type(self, name_or_id: Any) -> TaskType:
        """The task type by id, name, or code (FOLLOW_UP, MEETING)."""
        sub = self.sub
        return _resolve(
            "task type",
            name_or_id,
            self._task_types(),
            where=f"in account '{sub}'",
            empty_hint=_sync_hint(sub, "task types"),
            miss_hint=f"`amohook task-types --subdomain {sub}` lists them",
        )

    def user(self, name_email_or_id: Any) -> User:
        """The user by id, e-mail or name (inactive users too: check ``is_active`` if it matters)."""
        sub = self.sub
        return _resolve(
            "user",
            name_email_or_id,
            self._users(),
            where=f"in account '{sub}'",
            empty_hint=_sync_hint(sub, "users") + " (with an admin's token: GET /api/v4/users needs admin rights)",
            miss_hint=f"`amohook users --subdomain {sub}` lists them",
        )

    def custom_field(self, name_or_id: Any, entity_type: str = "leads") -> CustomField:
        """The custom field of ``entity_type`` (only lead fields are synced) by id, name or code."""
        sub = self.sub
        return _resolve(
            f"{entity_type[:-1] if entity_type.endswith('s') else entity_type} custom field",
            name_or_id,
            self._fields(entity_type),
            where=f"in account '{sub}'",
            empty_hint=_sync_hint(sub, "custom fields"),
            miss_hint="check the field's name in amoCRM (run `amohook sync-entities` if it is new)",
        )


def find_pipeline(account: str | Account, name_or_id: Any) -> Pipeline:
    """The pipeline named or numbered ``name_or_id``."""
    return Catalog(account).pipeline(name_or_id)


def find_stage(account: str | Account, pipeline: Pipeline | Any, name_or_id: Any) -> Stage:
    """The stage ``name_or_id`` of ``pipeline``; also "won" and "lost" (see ``Catalog.stage``)."""
    return Catalog(account).stage(pipeline, name_or_id)


def find_task_type(account: str | Account, name_or_id: Any) -> TaskType:
    """The task type by id, name, or code (FOLLOW_UP, MEETING)."""
    return Catalog(account).task_type(name_or_id)


def find_user(account: str | Account, name_email_or_id: Any) -> User:
    """The user by id, e-mail or name (inactive users too: check ``is_active`` if it matters)."""
    return Catalog(account).user(name_email_or_id)


def find_custom_field(account: str | Account, name_or_id: Any, entity_type: str = "leads") -> CustomField:
    """The custom field of ``entity_type`` (only lead fields are synced) by id, name or code."""
    return Catalog(account).custom_field(name_or_id, entity_type)
