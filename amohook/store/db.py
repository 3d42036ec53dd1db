"""Connect by URL and set per-backend options (opening and the schema: ``amohook.store.open``).

One ``Store`` per process. Models are bound through a proxy, so the rest of the library imports
models and uses them; ``Store`` only decides where they live.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlparse

import peewee

from amohook.errors import ConfigError, StoreMissing

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
        commit (the listener's, the action sender's) makes everything before it durable. The setting
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
    if tables and "schema_version" not in tables:  # models.SchemaVersion, the first table a store gets
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
