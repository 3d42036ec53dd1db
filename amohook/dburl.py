"""Checking a MySQL/PostgreSQL database URL before any driver sees it.

A URL the drivers cannot parse used to surface as a ValueError or TypeError from deep inside
(exit 1, "a bug"), sometimes quoting the URL, password included. Here each mistake becomes a
one-line ``ConfigError`` (exit 2) that names the fix and shows the URL only with its password
replaced. Standard library only: the CLI checks the URL at start-up, before peewee is imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from amohook.errors import ConfigError
from amohook.redact import hold_secret

# What a URL's query may set, per backend. Anything else is refused rather than handed to the
# driver (an unknown keyword is a TypeError in PyMySQL; timeouts come from AMOHOOK_DB_TIMEOUT).
MYSQL_OPTIONS = {"charset", "ssl_ca", "ssl_cert", "ssl_key", "ssl_verify_cert", "ssl_verify_identity", "unix_socket"}
POSTGRES_OPTIONS = {
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "application_name",
    "target_session_attrs",
    "gssencmode",
    "channel_binding",
}
POOL_OPTIONS = {"max_connections", "stale_timeout", "timeout"}
SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}
FORMS = "mysql://USER:PASS@HOST:PORT/DB or postgresql://USER:PASS@HOST:PORT/DB"


def redact(url: str) -> str:
    """The URL with everything between the scheme's ``//`` and the last ``@`` but the user name hidden.

    Splitting at the last ``@`` also hides a password holding an unencoded ``/``, ``?`` or ``#``,
    which a URL parser would cut in the wrong place.
    """
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    if "@" not in rest:
        return url
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0] if ":" in creds else creds
    for stop in "/?#":
        user = user.split(stop, 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"


def _bad(url: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"the database URL '{redact(url)}' {problem} — {fix}")


def check_server_url(url: str) -> None:
    """Refuse a MySQL/PostgreSQL URL the drivers would choke on; say how to fix it."""
    scheme, _, rest = url.partition("://")
    kind = scheme.lower().split("+")[0]
    pooled = "+pool" in scheme.lower()
    # The authority ends at the first '/', '?' or '#'; an '@' after that point means the
    # password (or user name) holds one of those characters unencoded.
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    if "@" in rest[cut:]:
        raise _bad(
            url,
            "has a '/', '?' or '#' in its password or user name",
            "percent-encode the password (/ → %2F, ? → %3F, # → %23, @ → %40, % → %25)",
        )
    if "#" in rest:
        raise _bad(url, "has a '#' part", "remove it (a '#' in the password is written %23)")
    parts = urlsplit(url)
    hold_secret(parts.password, unquote(parts.password or ""))  # the drivers' logs may show it
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise _bad(url, "has an invalid port", "give a port from 1 to 65535 (or none for the default)")
    database = parts.path[1:]
    if not database or "/" in database:
        raise _bad(
            url,
            "names no database" if not database else "has a '/' in the database name",
            f"add the database's name after the host: {FORMS}",
        )
    allowed = (MYSQL_OPTIONS if kind == "mysql" else POSTGRES_OPTIONS) | (POOL_OPTIONS if pooled else set())
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in allowed:
            raise _bad(
                url,
                f"has the unknown option '{key[:40]}'",
                f"use only {', '.join(sorted(allowed))} (timeouts: AMOHOOK_DB_TIMEOUT)",
            )
        if key == "charset":
            from pymysql.charset import charset_by_name

            if charset_by_name(value) is None:
                raise _bad(url, f"asks for the unknown charset '{value[:40]}'", "use charset=utf8mb4 or leave it out")
        if key == "sslmode" and value not in SSLMODES:
            raise _bad(url, f"asks for the unknown sslmode '{value[:40]}'", f"use one of {', '.join(sorted(SSLMODES))}")


def sqlite_path(url: str) -> Path:
    """The absolute file an ``sqlite://`` URL names; in-memory, empty and relative ones are refused.

    An in-memory store forgets every acknowledged webhook with the process and is private to one
    connection, so `serve` would answer 503 for ever: there is no use for it here. A relative path
    is looked up from the directory amohook starts in, which differs between a shell, cron
    (``$HOME``) and systemd (``WorkingDirectory=``): two stores, each missing what the other holds.
    """
    rest = url.split("://", 1)[1] if "://" in url else ""
    rest = rest.split("?", 1)[0]
    if rest.startswith("/"):
        rest = rest[1:]  # sqlite:////absolute/path; sqlite:///relative/path
    if not rest or rest == ":memory:" or rest.startswith("file::memory:") or "mode=memory" in url:
        raise ConfigError(f"'{url}' names no database file — give an absolute path: sqlite:////absolute/path.db")
    path = Path(rest).expanduser()
    if not path.is_absolute():
        here = os.path.abspath(rest)
        meant = f"sqlite:////{rest} if you meant /{rest}, or " if not rest.startswith(("./", "../")) else ""
        raise ConfigError(
            f"the SQLite URL '{url}' names the relative path '{rest}', which depends on the directory "
            f"amohook is started from (cron's and systemd's differ) — write an absolute path (four slashes): "
            f"{meant}sqlite:///{here} for the file under the current directory"
        )
    return path
