"""Connect by URL, set per-backend options, and bring the schema up to date.

One ``Store`` per process. Models are bound through a proxy, so the rest of the library imports
models and uses them; ``Store`` only decides where they live.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlparse

import peewee

from amohook.errors import ConfigError, StoreError, StoreMissing
from amohook.store import models
from amohook.store.migrations import migrate

# WAL lets readers (healthz, status) run beside the writer; busy_timeout makes a writer wait for
# the lock instead of failing at once. synchronous=FULL: a committed webhook survives power loss,
# which is what a 200 to amoCRM promises; the listener's group commit pays one fsync per batch.
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "busy_timeout": 10_000,
    "synchronous": "full",
    "foreign_keys": 1,
}


class Store:
    """An open database plus the few backend differences the library has to know about."""

    def __init__(self, db: peewee.Database, url: str, timeout: float = 30.0):
        self.db = db
        self.url = url
        self.timeout = timeout  # the bound on any one database wait (AMOHOOK_DB_TIMEOUT)
        # SQLite has one write lock per file and its busy handler sleeps in growing steps, so
        # threads of one process fighting over it stall each other for milliseconds; queueing them
        # on a mutex first hands the lock over at once. Other processes still meet at SQLite's lock.
        self._write_lock = threading.RLock()
        self.notes: list[str] = []  # things the admin should hear about at start (loose file modes)

    @property
    def is_sqlite(self) -> bool:
        return isinstance(self.db, peewee.SqliteDatabase)

    @property
    def is_mysql(self) -> bool:
        return isinstance(self.db, peewee.MySQLDatabase)

    @property
    def is_postgres(self) -> bool:
        return isinstance(self.db, peewee.PostgresqlDatabase)

    @property
    def sqlite_path(self) -> Path | None:
        return Path(self.db.database) if self.is_sqlite else None

    @contextmanager
    def write(self):
        """A transaction that takes the write lock up front where SQLite needs it (read decides write)."""
        if not self.is_sqlite:
            with self.db.atomic():
                yield
            return
        with self._write_lock:
            with self.db.atomic("IMMEDIATE"):
                yield

    def for_update(self, query, skip_locked: bool = False):
        """Lock the selected rows on MySQL/PostgreSQL; on SQLite ``write()`` already holds the lock."""
        if self.is_sqlite:
            return query
        return query.for_update(skip_locked=skip_locked) if skip_locked else query.for_update()

    def relax_durability(self) -> None:
        """For worker threads: skip the fsync of their own commits on SQLite.

        What workers write (attempts, statuses, recorded actions) can be derived again: events are
        processed at least once and actions are keyed. With WAL, synchronous=NORMAL still survives a
        crash of the process; only a power cut can roll back the last commits, and the next FULL
        commit (the listener's, the task sender's) makes everything before it durable. The setting
        is per connection, so the listener keeps synchronous=FULL for what it acknowledges.
        """
        if self.is_sqlite:
            self.db.execute_sql("PRAGMA synchronous=NORMAL")

    def close_quietly(self) -> None:
        """Drop this thread's connection, ignoring errors (after a failure, or when a thread ends)."""
        try:
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        if not self.db.is_closed():
            self.db.close()

    def ping(self) -> None:
        self.db.execute_sql("SELECT 1")


SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_file(url: str) -> Path:
    """The absolute file an ``sqlite://`` URL names (``dburl.sqlite_path``: relative and in-memory
    ones are refused)."""
    from amohook.dburl import sqlite_path

    return sqlite_path(url)


def _refuse(path: Path, what: str) -> ConfigError:
    return ConfigError(
        f"the database path '{path}' is {what}, not an amohook SQLite store — "
        "fix --db-url / AMOHOOK_DB_URL to name a new or existing .db file (nothing was changed)"
    )


def _prepare_sqlite_file(path: Path, create: bool = True) -> None:
    """Make sure ``path`` is an SQLite store amohook may use, creating it (dir 0700, file 0600) if
    new and ``create`` (else a missing store is ``StoreMissing``).

    Modes are set only on what this function creates: the store holds the client secret and the
    tokens, but a typo in root's crontab must never chmod a system directory or someone's file.
    An existing path that is not amohook's SQLite database (a directory, a symlink, a text file,
    an empty file, a device, another program's database) is refused before anything is touched —
    opening it through peewee would already switch it to WAL; an existing store with loose
    permissions is left as it is and reported by ``loose_permissions()``.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ConfigError(f"cannot inspect the database path '{path}': {exc.strerror}") from None
    if st is None:
        if not create:
            raise StoreMissing(str(path))
        _create_sqlite_file(path)
        return _prepare_sqlite_file(path, create)
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, "a symbolic link")
    if stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "a directory")
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, "a special file")
    if st.st_size == 0:
        # amohook never leaves one (a new store is made whole, then linked into place), so an
        # empty file is someone else's: `touch`, a failed copy, a truncated backup.
        raise _refuse(path, "an empty file")
    try:
        with open(path, "rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise ConfigError(f"cannot read the database file '{path}': {exc.strerror}") from None
    if header != SQLITE_HEADER:
        raise _refuse(path, "a file that is not an SQLite database")
    _check_writable(path, st)
    tables = _sqlite_tables(path)
    if not tables and not create:
        raise StoreMissing(str(path))
    if tables and models.SchemaVersion._meta.table_name not in tables:
        raise _refuse(path, "another program's SQLite database")


def _check_writable(path: Path, st: os.stat_result) -> None:
    """Every command may write (a token refresh, a queued event) and SQLite keeps its journal
    beside the file, so a store this user cannot write — cron or a unit under another user than the
    store's owner — is a person's mistake, said at once rather than as a failing write later."""
    if os.access(path, os.R_OK | os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(path.parent).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise ConfigError(
            f"the store '{path}' is on a read-only file system — mount it read-write, or under systemd give "
            f"the unit write access to '{path.parent}' (StateDirectory= or ReadWritePaths=)"
        )
    what = f"the file '{path}'" if not os.access(path, os.R_OK | os.W_OK) else f"its directory '{path.parent}'"
    raise ConfigError(
        f"the store '{path}' cannot be written by this user ({_user(os.getuid())}): {what} belongs to "
        f"{_user(st.st_uid if what.startswith('the file') else path.parent.stat().st_uid)} — run amohook as that "
        "user (cron: its crontab; systemd: User=), or give this user the store"
    )


def _user(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name}, uid {uid}"
    except KeyError:
        return f"uid {uid}"


def _sqlite_tables(path: Path) -> set[str]:
    """The tables of an existing SQLite file, read without changing it (no pragma, no WAL switch;
    ``mode=rw`` never creates a file that vanished meanwhile)."""
    import sqlite3
    from urllib.parse import quote

    try:
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=rw", uri=True, timeout=10)
        try:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc) or "malformed" in str(exc):
            raise _refuse(path, f"an unreadable SQLite database ({exc})") from None
        raise  # disk full, I/O, locked: open_store tells a person's problem from a passing one
    return {row[0] for row in rows}


def _create_sqlite_file(path: Path) -> None:
    """A new, valid SQLite file at ``path`` (mode 0600, its directory 0700 if new), or nothing if
    something appeared there meanwhile: written beside it, then linked into place (never replacing),
    so no process ever sees a half-made or empty store."""
    import sqlite3

    directory = path.parent
    if os.path.lexists(directory) and not directory.is_dir():
        raise _refuse(directory, "not a directory")
    if not os.path.lexists(directory):
        directory.mkdir(parents=True, mode=0o700)
    temp = directory / f".{path.name}.new-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    os.close(fd)
    try:
        conn = sqlite3.connect(str(temp))
        try:
            conn.execute("PRAGMA journal_mode=wal")  # writes the header: the file is a database now
        finally:
            conn.close()
        try:
            os.link(temp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
    finally:
        for leftover in (temp, Path(f"{temp}-wal"), Path(f"{temp}-shm")):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass


def loose_permissions(path: Path) -> str | None:
    """A warning when an existing store can be read by other users; amohook never changes it itself."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    if mode & 0o077:
        return (
            f"the database file '{path}' is readable or writable by other users (mode {mode:04o}); "
            f"it holds tokens and the client secret — run: chmod 600 '{path}'"
        )
    return None


DEFAULT_TIMEOUT = 30.0  # seconds; the CLI passes AMOHOOK_DB_TIMEOUT


def _lock_wait(timeout: float) -> int:
    """Server-side lock waits (whole seconds) end a little before the client stops listening,
    so a busy lock is reported as such rather than as a lost connection."""
    return max(1, int(timeout * 0.8))


def connect_url(url: str, timeout: float = DEFAULT_TIMEOUT, *, create: bool = True) -> peewee.Database:
    """The database ``url`` names, with every wait on it bounded by ``timeout`` seconds.

    MySQL: PyMySQL's connect/read/write timeouts (a server that accepts and then says nothing,
    e.g. a stopped one, otherwise blocks a read for ever). PostgreSQL: libpq's connect_timeout,
    server-side statement and lock timeouts, and a psycopg2 wait callback that gives up on a
    server that stops answering mid-query (only the client can notice a stopped server).
    ``create=False``: a missing SQLite store is ``StoreMissing``, never made.
    """
    scheme = url.split(":", 1)[0].lower()
    kwargs: dict = {}
    if scheme.startswith("sqlite"):
        path = sqlite_file(url)
        _prepare_sqlite_file(path, create)
        # Built directly, not through playhouse.db_url: that imports every backend's extension
        # (~20 ms a command start) and would cut a path holding '#' or '?'.
        return peewee.SqliteDatabase(str(path), pragmas=SQLITE_PRAGMAS, field_types={"LONGTEXT": "TEXT"}, timeout=10)
    from amohook.dburl import check_server_url, redact

    check_server_url(url)
    lock_wait = _lock_wait(timeout)
    if scheme.startswith("mysql"):
        kwargs["field_types"] = {"LONGTEXT": "LONGTEXT"}
        extra = dict(parse_qsl(urlparse(url).query))
        kwargs.setdefault("charset", extra.get("charset", "utf8mb4"))
        # Under REPEATABLE READ, a claim's FOR UPDATE SKIP LOCKED over an index range takes gap
        # locks that block the listener's inserts of new events; READ COMMITTED takes none.
        # Nothing here relies on repeatable reads: every read that decides a write locks its rows.
        kwargs["init_command"] = "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"
        kwargs["connect_timeout"] = timeout
        kwargs["read_timeout"] = timeout
        kwargs["write_timeout"] = timeout
    else:
        kwargs["field_types"] = {"LONGTEXT": "TEXT"}
        kwargs["connect_timeout"] = max(2, int(round(timeout)))  # libpq: whole seconds, at least 2
        kwargs["options"] = f"-c statement_timeout={int(timeout * 1000)} -c lock_timeout={lock_wait * 1000}"
        kwargs["keepalives"] = 1
        kwargs["keepalives_idle"] = max(1, int(timeout))
        kwargs["keepalives_interval"] = 5
        kwargs["keepalives_count"] = 3
        _bound_psycopg2_waits(timeout)
    from playhouse.db_url import connect

    try:
        db = connect(url, unquote_password=True, unquote_user=True, **kwargs)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        # The URL passed check_server_url, so this is rare; never show the driver's text: it may
        # quote the URL, password included.
        raise ConfigError(
            f"the database URL '{redact(url)}' cannot be used ({type(exc).__name__}) — write it as "
            "mysql://USER:PASS@HOST:PORT/DB or postgresql://USER:PASS@HOST:PORT/DB, password percent-encoded"
        ) from None
    if isinstance(db, peewee.MySQLDatabase):
        _bound_mysql_lock_waits(db, lock_wait)
    return db


def _bound_mysql_lock_waits(db: peewee.MySQLDatabase, seconds: int) -> None:
    """Row and metadata lock waits (50 s and a year by default) end before the read timeout.

    Set on each new connection (peewee's hook): PyMySQL's init_command runs one statement only.
    """

    def initialize(conn, _base=db._initialize_connection):  # type: ignore[attr-defined]  # peewee's per-connection hook
        _base(conn)
        with conn.cursor() as cur:
            cur.execute(f"SET SESSION innodb_lock_wait_timeout = {int(seconds)}, lock_wait_timeout = {int(seconds)}")

    db._initialize_connection = initialize  # type: ignore[attr-defined]  # (undeclared in peewee's types)


_pg_timeout = DEFAULT_TIMEOUT


def _bound_psycopg2_waits(timeout: float) -> None:
    """Make psycopg2 wait for the server through ``_pg_wait``, which gives up after ``timeout`` s.

    The callback is process-wide (psycopg2 has one); a process has one store, hence one timeout.
    """
    global _pg_timeout
    import psycopg2.extensions

    _pg_timeout = timeout
    psycopg2.extensions.set_wait_callback(_pg_wait)


def _pg_wait(conn) -> None:
    """psycopg2's wait loop (as psycopg2.extras.wait_select) with a deadline; poll(), not select():
    a busy listener's descriptors may exceed select's limit of 1024."""
    import select

    import psycopg2
    import psycopg2.extensions as ext

    deadline = time.monotonic() + _pg_timeout
    poller = select.poll()
    registered = None
    try:
        while True:
            state = conn.poll()
            if state == ext.POLL_OK:
                return
            if state == ext.POLL_READ:
                mask = select.POLLIN
            elif state == ext.POLL_WRITE:
                mask = select.POLLOUT
            else:
                raise psycopg2.OperationalError(f"unexpected state from the PostgreSQL driver: {state}")
            if registered is None:
                poller.register(conn.fileno(), mask)
            else:
                poller.modify(conn.fileno(), mask)
            registered = mask
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise psycopg2.OperationalError(f"the database did not answer within {_pg_timeout:g} s (timed out)")
    except KeyboardInterrupt:
        conn.cancel()
        raise


_current: Store | None = None


def _note_loose_permissions(store: Store) -> None:
    """Tell (never fix) that the store file can be read by other users: it holds the tokens."""
    path = store.sqlite_path
    warning = loose_permissions(path) if path is not None else None
    store.notes = [warning] if warning else []
    if warning:
        logging.getLogger("amohook.store").warning("%s", warning)


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
    text = _describe(exc)
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
            f"{where} cannot be written (read-only: {_describe(exc)}) — run amohook as the user that owns the "
            "store, or point --db-url / AMOHOOK_DB_URL at a primary server that accepts writes"
        )
    if code in MYSQL_FULL or code in PG_FULL or full:
        return ConfigError(
            f"{where} cannot grow: its disk is full ({_describe(exc)}) — free space on it (`amohook prune` "
            "deletes old events once there is room to work), then run the command again"
        )
    if code in MYSQL_DENIED or code in PG_DENIED:
        return ConfigError(
            f"the database user may not use amohook's tables in {where} ({_describe(exc)}) — grant it all "
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


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
