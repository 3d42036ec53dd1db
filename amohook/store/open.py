"""Opening the store: connect, bind the models, bring the schema up to date, one store per process.

Apart from ``db.py`` (the connection and its bounds) so that the schema's migrations
(``amohook.store.migrations``), which work on a ``Store``, and the opening, which runs them, do not
import each other.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import peewee

from amohook.errors import ConfigError, StoreError, first_line
from amohook.store import models
from amohook.store.db import DEFAULT_TIMEOUT, Store, connect_url, loose_permissions, sqlite_file
from amohook.store.migrations import migrate

_current: Store | None = None


def _note_loose_permissions(store: Store) -> None:
    """Tell (never fix) that the store file can be read by other users: it holds the tokens.

    The note goes to ``store.notes``, which the CLI prints once; logging it as a warning too made
    every command say it twice (the log line and the CLI's own)."""
    path = store.sqlite_path
    warning = loose_permissions(path) if path is not None else None
    store.notes = [warning] if warning else []
    if warning:
        logging.getLogger("amohook.store").debug("%s", warning)


def open_store(
    url: str, *, migrate_schema: bool = True, timeout: float = DEFAULT_TIMEOUT, create: bool = True
) -> Store:
    """Open the database at ``url`` and make sure its schema is current (idempotent).

    ``create=False`` (every command but those that start a store): where there is no amohook
    store yet — no SQLite file, an empty database — raise ``StoreMissing`` and make nothing.

    The models are bound process-wide, so a process works with one store: opening the same URL
    again returns it (threads then get their own connections from peewee), and opening another
    URL rebinds the models to it. Every database wait is bounded by ``timeout`` seconds.
    """
    global _current
    if _current is not None and _current.url == url:
        _note_loose_permissions(_current)
        return _current
    import sqlite3

    try:
        db = connect_url(url, timeout, create=create)
        db.connect(reuse_if_open=True)
    except (OSError, peewee.PeeweeException, ImportError, sqlite3.Error) as exc:
        raise _open_error(exc, url, timeout) from None
    if _current is not None:
        _current.close()
    models.database.initialize(db)
    store = Store(db, url, timeout)
    _note_loose_permissions(store)
    _current = None
    if migrate_schema:
        try:
            migrate(store, create=create)
        except peewee.PeeweeException as exc:
            raise _open_error(exc, url, timeout) from None
    _current = store
    return store


def _open_error(exc: BaseException, url: str, timeout: float) -> Exception:
    from amohook.dburl import redact

    missing = missing_database(exc, url) or needs_person(exc, url)
    if missing is not None:
        return missing
    text = first_line(exc)
    if "invalid dsn" in text or "invalid connection option" in text:
        return ConfigError(f"the database URL '{redact(url)}' is refused by the PostgreSQL driver: {text}")
    if "timed out" in text.lower() or "timeout expired" in text.lower():
        return StoreError(
            f"the database at '{redact(url)}' did not answer within {timeout:g} s — check that the server "
            "is up and reachable (the bound is AMOHOOK_DB_TIMEOUT)"
        )
    return StoreError(f"cannot open the database: {text}")


def missing_database(exc: BaseException, url: str) -> ConfigError | None:
    """A MySQL/PostgreSQL database that does not exist is a setup step for a person, not an outage:
    a ConfigError (exit 2) with the statement that creates it; None for any other failure.

    Told by the driver's code: MySQL 1049 (ER_BAD_DB_ERROR), or 1044 (ER_DBACCESS_DENIED_ERROR),
    which is what a user without global rights gets for a missing database; PostgreSQL's
    3D000 (invalid_catalog_name), whose code psycopg2 does not carry for a failed connection, so its
    message, 'database "NAME" does not exist', as the server sends it (in English unless the
    server's lc_messages says otherwise).
    """
    import re
    from urllib.parse import unquote, urlsplit

    scheme = url.split(":", 1)[0].lower()
    if not scheme.startswith(("mysql", "postgres")):
        return None
    parts = urlsplit(url)
    name, user = unquote(parts.path[1:]), unquote(parts.username or "")
    server = parts.netloc.rsplit("@", 1)[-1] or "the local server"  # host[:port], never the password
    code, text = _driver_code(exc), str(exc)
    if scheme.startswith("mysql"):
        quoted = _quoted(name, "`")
        charset = "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        if code == 1049:
            return ConfigError(
                f"the database '{name}' does not exist on {server} — create it as a MySQL "
                f"administrator: CREATE DATABASE {quoted} {charset}; then run the command again"
            )
        if code == 1044:
            said = re.search(r"for user ('[^']*'@'[^']*')", text)
            grantee = said.group(1) if said else "'" + user.replace("'", "''") + "'@'%'"
            return ConfigError(
                f"the MySQL user {grantee} may not use the database '{name}' on {server}, or it does not "
                f"exist — as a MySQL administrator run: CREATE DATABASE IF NOT EXISTS {quoted} {charset}; "
                f"GRANT ALL PRIVILEGES ON {quoted}.* TO {grantee}; then run the command again"
            )
        return None
    if code == "3D000" or re.search(r'database ".*" does not exist', text):
        create = f"CREATE DATABASE {_quoted(name, PG_QUOTE)}" + (f" OWNER {_quoted(user, PG_QUOTE)}" if user else "")
        return ConfigError(
            f"the database '{name}' does not exist on {server} — create it as a PostgreSQL "
            f"superuser (e.g. in `sudo -u postgres psql`): {create}; then run the command again"
        )
    return None


# Driver codes of failures that only a person can end (a retry by cron would fail the same way).
MYSQL_LOGIN_REFUSED = {1045, 1698}  # ER_ACCESS_DENIED_ERROR, ER_ACCESS_DENIED_NO_PASSWORD_ERROR
MYSQL_READ_ONLY = {1290, 1792, 1836}  # --read-only, a read-only transaction, read-only mode
MYSQL_FULL = {1021, 1114}  # ER_DISK_FULL, ER_RECORD_FILE_FULL ("The table is full")
MYSQL_DENIED = {1142, 1143}  # ER_TABLEACCESS_DENIED_ERROR, ER_COLUMNACCESS_DENIED_ERROR
PG_LOGIN_REFUSED = {"28P01", "28000"}  # invalid_password, invalid_authorization_specification
PG_READ_ONLY = {"25006"}  # read_only_sql_transaction (a standby, default_transaction_read_only)
PG_FULL = {"53100"}  # disk_full
PG_DENIED = {"42501"}  # insufficient_privilege


def needs_person(exc: BaseException, url: str) -> ConfigError | None:
    """A database failure that retrying cannot end — the login is refused, the store is read-only
    or its disk is full, the user lacks a right — as a ConfigError (exit 2) naming the fix; None
    for anything else (an outage stays temporary, exit 4).

    Told by the driver's code where it has one (PyMySQL's number, psycopg2's SQLSTATE), else by
    the text SQLite, libpq and the servers send (libpq's connection errors carry no SQLSTATE).
    """
    from urllib.parse import unquote, urlsplit

    from amohook.dburl import redact

    code, text = _driver_code(exc), str(exc)
    low = text.lower()
    scheme = url.split(":", 1)[0].lower()
    full = "disk is full" in low or "no space left" in low
    if scheme.startswith("sqlite"):
        where = f"the store '{sqlite_file(url)}'"
        # SQLite reports a full disk met while making its journal or shared memory as an I/O error.
        full = full or ("disk i/o error" in low and _no_space_beside(sqlite_file(url)))
    else:
        parts = urlsplit(url)
        where = f"the database '{unquote(parts.path[1:])}' on {parts.netloc.rsplit('@', 1)[-1] or 'the local server'}"
    if (
        code in MYSQL_LOGIN_REFUSED
        or code in PG_LOGIN_REFUSED
        or "password authentication failed" in low
        or "no pg_hba.conf entry" in low
        or ("role " in low and "does not exist" in low)
        or "no password supplied" in low
    ):
        user = unquote(urlsplit(url).username or "")
        return ConfigError(
            f"the database server refused the login{f' of {user!r}' if user else ''} to {where} — check the user "
            f"name and password in --db-url / AMOHOOK_DB_URL ({redact(url)}; special characters percent-encoded) "
            "and that the user may connect from this host"
        )
    if code in MYSQL_READ_ONLY or code in PG_READ_ONLY or "readonly database" in low or "read-only" in low:
        return ConfigError(
            f"{where} cannot be written (read-only: {first_line(exc)}) — run amohook as the user that owns the "
            "store, or point --db-url / AMOHOOK_DB_URL at a primary server that accepts writes"
        )
    if code in MYSQL_FULL or code in PG_FULL or full:
        return ConfigError(
            f"{where} cannot grow: its disk is full ({first_line(exc)}) — free space on it (`amohook prune` "
            "deletes old events once there is room to work), then run the command again"
        )
    if code in MYSQL_DENIED or code in PG_DENIED:
        return ConfigError(
            f"the database user may not use amohook's tables in {where} ({first_line(exc)}) — grant it all "
            "privileges on that database"
        )
    return None


def _no_space_beside(path: Path) -> bool:
    """Less than 64 KiB free for this user where the store and its journal live."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


PG_QUOTE = '"'


def _quoted(identifier: str, quote: str) -> str:
    """An SQL identifier quoted as MySQL (`) or PostgreSQL (") reads it: any name, exactly."""
    return quote + identifier.replace(quote, quote * 2) + quote


def _driver_code(exc: BaseException) -> int | str | None:
    """The driver's error code behind peewee's wrapper: PyMySQL's number (the first argument, which
    peewee keeps), psycopg2's SQLSTATE (on the driver's exception, peewee's context)."""
    for candidate in (exc, exc.__context__, exc.__cause__):
        if candidate is None:
            continue
        pgcode = getattr(candidate, "pgcode", None)
        if pgcode:
            return str(pgcode)
        if candidate.args and isinstance(candidate.args[0], int):
            return candidate.args[0]
    return None
