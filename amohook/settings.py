"""Where configuration is resolved: one place, one written-down lookup order.

Lookup order for every setting: command-line flag, then the ``AMOHOOK_*`` environment variable,
then the default. Only the CLI resolves settings here; the library takes them as arguments, and
takes its defaults from the constants below (each declared once, for the CLI and the library).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from amohook.errors import ConfigError

ENV_DB_URL = "AMOHOOK_DB_URL"
ENV_DATA_DIR = "AMOHOOK_DATA_DIR"
ENV_STATE_DIRECTORY = "STATE_DIRECTORY"  # systemd's, from StateDirectory= (systemd.exec(5))
ENV_CLIENT_SECRET = "AMOHOOK_CLIENT_SECRET"
ENV_LONG_LIVED_TOKEN = "AMOHOOK_LONG_LIVED_TOKEN"
ENV_WEBHOOK_SECRET = "AMOHOOK_WEBHOOK_SECRET"
ENV_STATUS_PASSWORD = "AMOHOOK_STATUS_PASSWORD"  # /status and /metrics; off when unset
ENV_RULES = "AMOHOOK_RULES"
ENV_DB_TIMEOUT = "AMOHOOK_DB_TIMEOUT"

# The longest any one database wait may take (connecting, a query, a lock), so a hung server
# makes cron's run fail with exit 4 instead of piling up processes.
DEFAULT_DB_TIMEOUT = 30.0

DOMAINS = ("amocrm.ru", "amocrm.com", "kommo.com")

# -- defaults shared by the CLI (`serve`, `worker`), the Supervisor, the worker and the sender --
MAX_ATTEMPTS = 10  # an event's attempts before it is dead; an action's before it has failed
LEASE_SECONDS = 300.0  # how long a claimed event or action stays reserved (renewed while it runs)
BATCH_SIZE = 10  # events a worker claims at a time
POLL_SECONDS = 1.0  # between a worker's looks at an empty queue
RECONCILE_EVERY = 300.0  # between reconciliation passes, when --rules or --handler is given
# Attempts of one request inside the amoCRM client, per caller (runtime/clients.py):
HANDLER_CLIENT_ATTEMPTS = 5  # a handler's reads are retried within the request
SENDER_CLIENT_ATTEMPTS = 1  # a 429 or a failure comes back to the sender, which reschedules the batch
RECONCILE_CLIENT_ATTEMPTS = 3  # reads only; the next pass tries again anyway


def data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the default SQLite store lives: $AMOHOOK_DATA_DIR, else systemd's $STATE_DIRECTORY
    (set by a unit's ``StateDirectory=``, so a service and the commands run for it share one store),
    else $XDG_DATA_HOME/amohook, else ~/.local/share/amohook."""
    env = os.environ if environ is None else environ
    if env.get(ENV_DATA_DIR):
        path = Path(env[ENV_DATA_DIR]).expanduser()
        if not path.is_absolute():
            raise ConfigError(
                f"{ENV_DATA_DIR} '{env[ENV_DATA_DIR]}' is a relative path, which depends on the directory amohook "
                f"is started from — give an absolute one (e.g. {os.path.abspath(path)})"
            )
        return path
    if env.get(ENV_STATE_DIRECTORY):
        # systemd.exec(5): several StateDirectory= entries arrive colon-separated; the first is ours.
        return Path(env[ENV_STATE_DIRECTORY].split(":", 1)[0])
    base = env.get("XDG_DATA_HOME") or ""
    if not Path(base).expanduser().is_absolute():
        base = str(Path.home() / ".local" / "share")  # the XDG spec: a relative value is ignored
    return Path(base).expanduser() / "amohook"


def default_db_url(environ: Mapping[str, str] | None = None) -> str:
    return f"sqlite:///{data_dir(environ) / 'amohook.db'}"


def resolve_db_url(flag: str | None, environ: Mapping[str, str] | None = None) -> str:
    """--db-url, then $AMOHOOK_DB_URL, then an SQLite file in ``data_dir()``."""
    env = os.environ if environ is None else environ
    url = flag or env.get(ENV_DB_URL) or default_db_url(env)
    scheme = url.split(":", 1)[0].lower()
    if "://" not in url or scheme.split("+")[0] not in ("sqlite", "mysql", "postgres", "postgresql"):
        raise ConfigError(
            f"unsupported database URL '{redact_url(url)}' — use sqlite:///PATH, "
            "mysql://USER:PASS@HOST/DB or postgresql://USER:PASS@HOST/DB"
        )
    if scheme.startswith("sqlite"):
        from amohook.dburl import sqlite_path

        sqlite_path(url)
    else:
        from amohook.dburl import check_server_url

        check_server_url(url)
    return url


def resolve_db_timeout(environ: dict | None = None) -> float:
    """$AMOHOOK_DB_TIMEOUT seconds (1-3600), else ``DEFAULT_DB_TIMEOUT``."""
    env = os.environ if environ is None else environ
    raw = (env.get(ENV_DB_TIMEOUT) or "").strip()
    if not raw:
        return DEFAULT_DB_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 1 <= value <= 3600:
        raise ConfigError(f"{ENV_DB_TIMEOUT} must be a number of seconds from 1 to 3600 (got '{raw[:20]}')")
    return value


def redact_url(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    from amohook.dburl import redact

    return redact(url)


def base_url_for(subdomain: str, domain: str | None = None, base_url: str | None = None) -> str:
    """The account's API base URL: given explicitly (proxies, tests), else https://{subdomain}.{domain}."""
    if base_url:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"--base-url must start with https:// (got '{base_url}')")
        return base_url.rstrip("/")
    domain = (domain or "amocrm.ru").lower().lstrip(".")
    if domain not in DOMAINS:
        raise ConfigError(f"unknown domain '{domain}' — use one of {', '.join(DOMAINS)}, or --base-url")
    return f"https://{subdomain}.{domain}"


def check_subdomain(subdomain: str) -> str:
    sub = (subdomain or "").strip().lower()
    # The user often pastes the whole host or URL; accept it and keep the first label.
    for prefix in ("https://", "http://"):
        if sub.startswith(prefix):
            sub = sub[len(prefix) :]
    sub = sub.split("/", 1)[0]
    for domain in DOMAINS:
        if sub.endswith("." + domain):
            sub = sub[: -len(domain) - 1]
    if not sub or not all(c.isalnum() or c in "-_" for c in sub):
        raise ConfigError(f"'{subdomain}' is not an amoCRM subdomain — give the part before .amocrm.ru")
    return sub


def secret_from(flag: str | None, env_name: str, environ: dict | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return flag or env.get(env_name) or None


@dataclass(frozen=True)
class Settings:
    db_url: str
    traceback: bool = False
    db_timeout: float = DEFAULT_DB_TIMEOUT
