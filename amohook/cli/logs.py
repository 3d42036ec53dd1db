"""Where `serve` and `worker` log, and in which shape: the terminal, or systemd's journal.

Under systemd, stderr is a stream into journald, which stamps every line with its own time and
reads a priority from a ``<N>`` prefix (sd-daemon(3): https://www.freedesktop.org/software/systemd/man/latest/sd-daemon.html).
So there each line starts with ``<N>`` — ``journalctl -p warning -u amohook`` then shows warnings
and errors only — and carries no timestamp of ours. Elsewhere lines keep their timestamp.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from enum import StrEnum

# The libraries whose loggers --library-log-level opens; their debug output carries SQL statements
# with their parameters (peewee) and request lines (urllib3), so it stays off unless asked for.
LIBRARIES = ("peewee", "urllib3", "requests", "pymysql", "psycopg2")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"


class Level(StrEnum):
    """The levels --log-level and --library-log-level accept."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def journal_stderr(environ: dict | None = None, stream=None) -> bool:
    """True when stderr is systemd's journal stream.

    systemd sets ``JOURNAL_STREAM=DEVICE:INODE`` for the stream it connects; systemd.exec(5) says to
    compare it with stderr's own, so `amohook serve 2>file` in a shell started by a unit (which
    inherits the variable) is not mistaken for the journal.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat((sys.stderr if stream is None else stream).fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def priority(levelno: int) -> int:
    """The syslog priority journald files a record of this level under."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def prefixed(text: str, prio: int) -> str:
    """``<prio>`` before every line of ``text``: journald files each line as its own entry."""
    return "\n".join(f"<{prio}>{line}" for line in text.split("\n"))


def _formatter(journal: bool, secrets: Iterable[str]) -> logging.Formatter:
    from amohook.redact import RedactingFormatter

    class JournalFormatter(RedactingFormatter):
        def format(self, record: logging.LogRecord) -> str:
            # A traceback's every line gets the prefix, or journald would file it at the default.
            return prefixed(super().format(record), priority(record.levelno))

    if journal:
        return JournalFormatter(JOURNAL_FORMAT, secrets=secrets)
    return RedactingFormatter(TEXT_FORMAT, secrets=secrets)


def setup_logging(level: str, library_level: str = "warning", secrets: Iterable[str] = ()) -> None:
    """``level`` for amohook's own loggers, ``library_level`` for everything else (peewee, urllib3,
    …); one handler on stderr whose formatter drops secrets whatever logged the line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(journal_stderr(), tuple(secrets)))
    libraries = _numeric(library_level)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(libraries)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(libraries)
    logging.getLogger("amohook").setLevel(_numeric(level))


def _numeric(level) -> int:
    name = level.value if isinstance(level, Level) else str(level)
    numeric = logging.getLevelName(name.upper())
    if not isinstance(numeric, int):
        from amohook.errors import ConfigError

        raise ConfigError(f"unknown log level '{name}' — use debug, info, warning or error")
    return numeric


def announce(log: logging.Logger, message: str) -> None:
    """A start line (`listening on URL`, `worker started: …`): on stdout, where scripts wait for
    it, and in the log. Under systemd stdout is the journal too (StandardOutput=journal, stderr
    inherits it): there it is written once, as the log line with its priority — or, when the log
    level hides INFO, on stdout with the info priority's prefix."""
    if journal_stderr(stream=sys.stdout):
        if log.isEnabledFor(logging.INFO):
            log.info("%s", message)
        else:
            sys.stdout.write(prefixed(message, priority(logging.INFO)) + "\n")
            sys.stdout.flush()
        return
    from amohook.redact import printable

    sys.stdout.write(printable(message, multiline=True) + "\n")  # as cli.common.say writes
    sys.stdout.flush()
    log.info("%s", message)


def stderr_line(text: str, levelno: int) -> str:
    """A line written to stderr outside logging (an error, a warning of a one-shot command), with
    the journal's priority prefix when stderr is the journal."""
    return prefixed(text, priority(levelno)) if journal_stderr() else text
