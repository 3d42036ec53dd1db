"""Schema versions. Each migration runs in one transaction together with its version record,
under a cross-process lock, so many processes starting at once upgrade the schema exactly once.

MySQL commits DDL implicitly, so there a migration is not atomic; the advisory lock still keeps
two processes from running it at the same time, and every step is written to be re-runnable: it
adds only what is missing, and a table it needs and does not find stops it with ``SchemaMismatch``.

The version number is not trusted alone: on every open, one catalogue query checks that each table
and column the models declare is there (with a compatible type), so a store that does not match —
made by an unreleased build, half restored, edited by hand, or by a newer amohook — is refused
with exit 2 and the fix, instead of failing every command later as a "temporary" database error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING

from amohook.errors import SchemaMismatch
from amohook.store import models

if TYPE_CHECKING:
    from amohook.store.db import Store


def schema_lock_name() -> str:
    """MySQL: the SQL naming the schema lock of the connection's database. GET_LOCK's names are
    server-wide, so the name carries the database (hashed: names are capped at 64 characters) and
    a store never waits for an upgrade of another database on the same server. PostgreSQL's
    advisory locks are per database already."""
    return "CONCAT('amohook_schema.', MD5(DATABASE()))"


PG_LOCK_KEY = 0x616D6F68  # "amoh"


V1_MODELS = (
    "account",
    "lease",
    "oauth_state",
    "rate_window",
    "pipeline",
    "stage",
    "task_type",
    "user",
    "custom_field",
    "delivery",
    "event",
    "attempt",
    "action",
)


def _v1_initial(store: Store) -> None:
    tables = [m for m in models.ALL_MODELS if m._meta.table_name in V1_MODELS]
    store.db.create_tables(tables, safe=True)  # a new store's event table has today's columns


def _v2_refresh_marker(store: Store) -> None:
    """account.refresh_sent_at and account.clock_skew (a fresh v1 already has them)."""
    _add_columns(store, 2, models.Account, "refresh_sent_at", "clock_skew")


def _v3_reconciliation(store: Store) -> None:
    """Events from the log (event.source), the change registry, reconciliation state, subscriptions."""
    _add_columns(store, 3, models.Event, "source")
    store.db.create_tables([models.ChangeSeen, models.ReconcileState, models.Subscription], safe=True)
    _require_tables(store, 3, models.Action)
    _add_missing_indexes(store, models.Event, models.Action)


def _v4_store_setting(store: Store) -> None:
    """store_setting: values kept with the store (the webhook secret `serve` generated)."""
    store.db.create_tables([models.StoreSetting], safe=True)


def _v6_field_options(store: Store) -> None:
    """custom_field.enums: the options of select fields, for `rules check` (a fresh v1 already has it)."""
    _add_columns(store, 6, models.CustomField, "enums")


def _add_columns(store: Store, version: int, model: type[models.BaseModel], *names: str) -> None:
    """Add the model's columns ``names`` where they are missing; the table itself must be there."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as run

    table = model._meta.table_name
    have = _require_tables(store, version, model)[table]
    migrator = SchemaMigrator.from_database(store.db)
    fields = [model._meta.fields[name] for name in names]
    ops = [migrator.add_column(table, f.column_name, f) for f in fields if f.column_name not in have]
    if ops:
        run(*ops)


def _require_tables(store: Store, version: int, *needed: type[models.BaseModel]) -> dict[str, dict[str, str]]:
    """Stop a migration that would alter a table the store does not have (never "temporary");
    returns ``read_schema``'s answer."""
    found = read_schema(store)
    missing = [m._meta.table_name for m in needed if m._meta.table_name not in found]
    if missing:
        raise _mismatch(
            store, f"cannot be upgraded to schema version {version}", [f"missing table {t}" for t in missing]
        )
    return found


def _add_missing_indexes(store: Store, *tables) -> None:
    """Create the indexes a model declares that an older store lacks (by peewee's index names)."""
    for model in tables:
        present = {index.name for index in store.db.get_indexes(model._meta.table_name)}
        for index in model._meta.fields_to_index():
            if index._name not in present:
                store.db.execute(index)


def _v5_watchdog_removals(store: Store) -> None:
    """subscription.removed_at (what the watchdog removed itself, to re-add), action(event_id)."""
    _add_columns(store, 5, models.Subscription, "removed_at")
    _add_missing_indexes(store, models.Action)


def _v7_stale_entries(store: Store) -> None:
    """stale_entry: when a lead entered the stage a lead.stale rule watches."""
    store.db.create_tables([models.StaleEntry], safe=True)


MIGRATIONS: list[tuple[int, Callable[[Store], None]]] = [
    (1, _v1_initial),
    (2, _v2_refresh_marker),
    (3, _v3_reconciliation),
    (4, _v4_store_setting),
    (5, _v5_watchdog_removals),
    (6, _v6_field_options),
    (7, _v7_stale_entries),
]
LATEST = MIGRATIONS[-1][0]


def current_version(store: Store, found: dict[str, dict[str, str]] | None = None) -> int:
    """The highest version recorded (0: none); ``found`` is ``read_schema``'s answer if at hand."""
    table = models.SchemaVersion._meta.table_name
    if table not in (found if found is not None else store.db.get_tables()):
        return 0
    # Plain SQL: peewee's query building costs more than the query itself, on every command start.
    return store.db.execute_sql(f"SELECT MAX(version) FROM {table}").fetchone()[0] or 0


# One catalogue query per backend: (table, column, declared type) for the store's own schema.
SQLITE_COLUMNS = (
    "SELECT m.name, p.name, p.type FROM sqlite_master AS m JOIN pragma_table_info(m.name) AS p WHERE m.type = 'table'"
)
MYSQL_COLUMNS = (
    "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = DATABASE()"
)
# pg_catalog rather than information_schema: the same answer at a quarter of the cost.
POSTGRES_COLUMNS = (
    "SELECT c.relname, a.attname, format_type(a.atttypid, NULL) FROM pg_catalog.pg_attribute AS a "
    "JOIN pg_catalog.pg_class AS c ON c.oid = a.attrelid WHERE c.relnamespace = current_schema()::regnamespace "
    "AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped"
)


def read_schema(store: Store) -> dict[str, dict[str, str]]:
    """{table: {column: declared type}} as the database holds them now, in one query."""
    if store.is_sqlite:
        sql = SQLITE_COLUMNS
    elif store.is_mysql:
        sql = MYSQL_COLUMNS
    else:
        sql = POSTGRES_COLUMNS
    found: dict[str, dict[str, str]] = {}
    for table, column, declared in store.db.execute_sql(sql).fetchall():
        found.setdefault(_text(table), {})[_text(column)] = _text(declared or "")
    return found


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # MySQL 8 answers some as bytes


@functools.cache
def _kind(declared: str) -> str | None:
    """A type's kind by SQLite's affinity rules (https://www.sqlite.org/datatype3.html, 3.1), which
    read MySQL's and PostgreSQL's type names as well; booleans apart (PostgreSQL's are no integers).
    None: a type the rules give no clear kind (left alone: the check is loose on purpose)."""
    name = declared.upper()
    if name.startswith("BOOL"):
        return "boolean"
    if name == "AUTO" or "INT" in name:
        return "integer"
    if any(part in name for part in ("CHAR", "CLOB", "TEXT")):
        return "text"
    if any(part in name for part in ("REAL", "FLOA", "DOUB")):
        return "real"
    return None


@functools.cache
def _needed() -> tuple[tuple[str, tuple[tuple[str, str | None], ...]], ...]:
    """(table, ((column, kind), ...)) for every model: what the check compares, worked out once."""
    return tuple(
        (m._meta.table_name, tuple((f.column_name, _kind(f.field_type)) for f in m._meta.sorted_fields))
        for m in models.ALL_MODELS
    )


def schema_problems(store: Store, found: dict[str, dict[str, str]] | None = None) -> list[str]:
    """What the models need and the database lacks: missing tables and columns, columns of another
    kind of type. Empty when the store matches. ``found``: ``read_schema``'s answer, if at hand."""
    found = read_schema(store) if found is None else found
    problems = []
    for table, columns in _needed():
        have = found.get(table)
        if have is None:
            problems.append(f"missing table {table}")
            continue
        for column, need in columns:
            declared = have.get(column)
            if declared is None:
                problems.append(f"missing column {table}.{column}")
                continue
            kind = _kind(declared)
            if kind != need and kind is not None and not (need == "boolean" and kind == "integer"):
                problems.append(f"column {table}.{column} is {declared}, not {need}")
    return problems


def _where(store: Store) -> str:
    from amohook.dburl import redact

    return f"'{store.sqlite_path}'" if store.sqlite_path is not None else f"'{redact(store.url)}'"


MISMATCH_FIX = (
    "restore a backup of the store, or point --db-url / AMOHOOK_DB_URL at a new database and run `amohook init-auth`"
)


def summarize(problems: list[str]) -> str:
    """``schema_problems``' list on one line: the first four, then how many more."""
    return "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")


def _mismatch(store: Store, what: str, problems: list[str]) -> SchemaMismatch:
    return SchemaMismatch(
        f"the store at {_where(store)} {what} ({summarize(problems)}): this amohook did not make that schema — "
        f"{MISMATCH_FIX} (no data was changed)"
    )


def _refuse_newer(store: Store, version: int) -> SchemaMismatch:
    return SchemaMismatch(
        f"the store at {_where(store)} has schema version {version}, newer than this amohook knows ({LATEST}): "
        "a newer amohook upgraded it — upgrade this amohook to that version (a store is never downgraded; "
        "nothing was changed)"
    )


def _refuse_foreign(store: Store, found: dict[str, dict[str, str]]) -> None:
    """A database without our schema_version table but with tables named like ours belongs to
    something else: creating our tables beside them and altering theirs would harm both."""
    ours = [m._meta.table_name for m in models.ALL_MODELS if m._meta.table_name in found]
    if ours:
        raise SchemaMismatch(
            f"the database at {_where(store)} already holds tables named like amohook's ({', '.join(ours)}) "
            "but no schema_version table: amohook did not make them — give amohook a database of its own "
            "(--db-url / AMOHOOK_DB_URL); nothing was changed"
        )


@contextmanager
def _schema_lock(store: Store):
    if store.is_mysql:
        # Wait less than the connection's read timeout, and do not migrate without the lock.
        wait = max(1, int(store.timeout * 0.8))
        got = store.db.execute_sql(f"SELECT GET_LOCK({schema_lock_name()}, %s)", (wait,)).fetchone()[0]
        if got != 1:
            from amohook.errors import StoreError

            raise StoreError(f"another process has been upgrading the database schema for {wait} s — try again shortly")
        try:
            yield
        finally:
            store.db.execute_sql(f"SELECT RELEASE_LOCK({schema_lock_name()})")
    elif store.is_postgres:
        store.db.execute_sql("SELECT pg_advisory_lock(%s)", (PG_LOCK_KEY,))
        try:
            yield
        finally:
            store.db.execute_sql("SELECT pg_advisory_unlock(%s)", (PG_LOCK_KEY,))
    else:
        yield  # SQLite: BEGIN IMMEDIATE below is the lock


def migrate(store: Store, *, create: bool = True) -> int:
    """Apply every missing migration and check the result against the models; returns the schema
    version. Cheap when already current: one catalogue query and one version read.

    Raises ``SchemaMismatch`` for a store this amohook cannot use as it is, and ``StoreMissing``
    for a database amohook never set up when not ``create``.
    """
    found = read_schema(store)
    version = current_version(store, found)
    if version < LATEST:
        if models.SchemaVersion._meta.table_name not in found:
            _refuse_foreign(store, found)
            if not create:
                from amohook.errors import StoreMissing

                raise StoreMissing(_where(store).strip("'"))
        _upgrade(store)
        found = read_schema(store)
        version = current_version(store, found)
    if version > LATEST:
        raise _refuse_newer(store, version)
    problems = schema_problems(store, found)
    if problems:
        raise _mismatch(store, f"says schema version {version} but lacks part of it", problems)
    return version


def _upgrade(store: Store) -> None:
    """Run the migrations not yet recorded, each in one transaction with its record, under the lock."""
    with _schema_lock(store):
        with store.write():
            store.db.create_tables([models.SchemaVersion], safe=True)
        for version, step in MIGRATIONS:
            with store.write():
                if models.SchemaVersion.get_or_none(models.SchemaVersion.version == version):
                    continue
                step(store)
                models.SchemaVersion.create(version=version)
