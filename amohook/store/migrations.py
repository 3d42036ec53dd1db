"""Schema versions. Each migration runs in one transaction together with its version record,
under a cross-process lock, so many processes starting at once upgrade the schema exactly once.

MySQL commits DDL implicitly, so there a migration is not atomic; the advisory lock still keeps
two processes from running it at the same time, and every step is written to be re-runnable.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING

from peewee import DoubleField

from amohook.store import models

if TYPE_CHECKING:
    from amohook.store.db import Store

LOCK_NAME = "amohook_schema"
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
    """account.refresh_sent_at and account.clock_skew (a fresh v1 already has them: re-runnable)."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as run

    table = models.Account._meta.table_name
    have = {c.name for c in store.db.get_columns(table)}
    migrator = SchemaMigrator.from_database(store.db)
    ops = [
        migrator.add_column(table, name, DoubleField(null=True))
        for name in ("refresh_sent_at", "clock_skew")
        if name not in have
    ]
    if ops:
        run(*ops)


def _v3_reconciliation(store: Store) -> None:
    """Events from the log (event.source), the change registry, reconciliation state, subscriptions."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as run

    columns = {c.name for c in store.db.get_columns(models.Event._meta.table_name)}
    if "source" not in columns:
        run(
            SchemaMigrator.from_database(store.db).add_column(
                models.Event._meta.table_name, "source", models.Event.source
            )
        )
    store.db.create_tables([models.ChangeSeen, models.ReconcileState, models.Subscription], safe=True)
    _add_missing_indexes(store, models.Event, models.Action)


def _add_missing_indexes(store: Store, *tables) -> None:
    """Create the indexes a model declares that an older store lacks (by peewee's index names)."""
    for model in tables:
        present = {index.name for index in store.db.get_indexes(model._meta.table_name)}
        for index in model._meta.fields_to_index():
            if index._name not in present:
                store.db.execute(index)


MIGRATIONS: list[tuple[int, Callable[[Store], None]]] = [
    (1, _v1_initial),
    (2, _v2_refresh_marker),
    (3, _v3_reconciliation),
]
LATEST = MIGRATIONS[-1][0]


def current_version(store: Store) -> int:
    if not store.db.table_exists(models.SchemaVersion._meta.table_name):
        return 0
    return (
        models.SchemaVersion.select(models.SchemaVersion.version).order_by(models.SchemaVersion.version.desc()).scalar()
        or 0
    )


@contextmanager
def _schema_lock(store: Store):
    if store.is_mysql:
        # Wait less than the connection's read timeout, and do not migrate without the lock.
        wait = max(1, int(store.timeout * 0.8))
        got = store.db.execute_sql("SELECT GET_LOCK(%s, %s)", (LOCK_NAME, wait)).fetchone()[0]
        if got != 1:
            from amohook.errors import StoreError

            raise StoreError(f"another process has been upgrading the database schema for {wait} s — try again shortly")
        try:
            yield
        finally:
            store.db.execute_sql("SELECT RELEASE_LOCK(%s)", (LOCK_NAME,))
    elif store.is_postgres:
        store.db.execute_sql("SELECT pg_advisory_lock(%s)", (PG_LOCK_KEY,))
        try:
            yield
        finally:
            store.db.execute_sql("SELECT pg_advisory_unlock(%s)", (PG_LOCK_KEY,))
    else:
        yield  # SQLite: BEGIN IMMEDIATE below is the lock


def migrate(store: Store) -> int:
    """Apply every missing migration; returns the schema version. Cheap when already current."""
    if current_version(store) >= LATEST:
        return LATEST
    with _schema_lock(store):
        with store.write():
            store.db.create_tables([models.SchemaVersion], safe=True)
        for version, step in MIGRATIONS:
            with store.write():
                if models.SchemaVersion.get_or_none(models.SchemaVersion.version == version):
                    continue
                step(store)
                models.SchemaVersion.create(version=version)
    return current_version(store)
