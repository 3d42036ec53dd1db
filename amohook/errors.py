"""The exception hierarchy and the exit codes the CLI maps it to.

Every error amohook raises on purpose is an ``AmohookError``: it carries a one-line message that
names the cause and the fix, and the exit code cron should see. The CLI prints the message; only
``--traceback`` shows a stack.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes, documented in the README so cron can tell failures apart."""

    OK = 0
    ERROR = 1  # a bug or an unexpected failure
    USAGE = 2  # bad option, bad configuration, missing setup
    REAUTH = 3  # tokens revoked/missing: run `amohook init-auth` again
    TEMPORARY = 4  # network, amoCRM 5xx, rate limit, lock busy: retry later
    BLOCKED = 5  # amoCRM blocked the account's API access (403 after rate-limit abuse)
    UNHEALTHY = 6  # `doctor`: at least one check failed (✗); a person must act
    DEGRADED = 7  # `doctor`: no check failed, but one warns (!): look soon
    INTERRUPTED = 130


class AmohookError(Exception):
    """Base of every expected failure; ``str()`` is the one-line message for the user."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConfigError(AmohookError):
    """Bad option, environment or configuration; the message says which and how to fix it."""

    exit_code = ExitCode.USAGE


class PermanentError(AmohookError):
    """Raised by a handler when retrying cannot help: the event goes dead at once."""


class LoopDied(AmohookError):
    """A loop of `serve` or `worker` kept dying after its restarts: the process stops (exit 1) so
    that its service manager (systemd's ``Restart=``) starts it afresh; the log has each traceback."""

    def __init__(self, loop: str, deaths: int, error: BaseException):
        self.loop = loop
        self.deaths = deaths
        super().__init__(
            f"the {loop} loop died {deaths} time(s), last with {describe(error)} — amohook stopped so that "
            "its service manager starts it again; the log has the tracebacks"
        )


class StoreError(AmohookError):
    """The database cannot be opened or used."""

    exit_code = ExitCode.TEMPORARY


class SchemaMismatch(ConfigError):
    """The database does not hold the tables and columns this amohook needs (or says a newer
    amohook made it): retrying cannot help, a person has to restore, upgrade or re-point it."""


class StoreMissing(ConfigError):
    """No amohook store where the settings point: only `init-auth` (and `auth-url`, `serve`) make
    one; every other command says so instead of starting an empty store at a mistyped place."""

    def __init__(self, where: str):
        self.where = where
        super().__init__(
            f"no amohook store at {where} — run `amohook init-auth` first (or fix --db-url / AMOHOOK_DB_URL)"
        )


class AccountNotFound(ConfigError):
    def __init__(self, subdomain: str | None):
        self.subdomain = subdomain
        if subdomain:
            msg = f"no account '{subdomain}' in the store — run `amohook init-auth --subdomain {subdomain}` first"
        else:
            msg = "no account in the store — run `amohook init-auth` first"
        super().__init__(msg)


class AmbiguousAccount(ConfigError):
    def __init__(self, subdomains: list[str]):
        self.subdomains = subdomains
        super().__init__(f"several accounts are stored ({', '.join(subdomains)}) — pick one with --subdomain")


class ReauthRequired(AmohookError):
    """The stored grant is gone (revoked, expired, never made): only a new authorization helps."""

    exit_code = ExitCode.REAUTH


class TokenMissing(ReauthRequired):
    def __init__(self, subdomain: str):
        self.subdomain = subdomain
        super().__init__(f"account '{subdomain}' has no tokens — run `amohook init-auth --subdomain {subdomain}`")


class TokenRevoked(ReauthRequired):
    def __init__(self, subdomain: str, detail: str = "Token has been revoked"):
        self.subdomain = subdomain
        super().__init__(
            f"amoCRM says the refresh token of '{subdomain}' is no longer valid ({detail}) — "
            f"run `amohook init-auth --subdomain {subdomain}` with a new authorization code"
        )


class TemporaryError(AmohookError):
    """Network trouble, amoCRM 5xx, a rate limit or a busy lock: retrying later is the fix."""

    exit_code = ExitCode.TEMPORARY


class LockBusy(TemporaryError):
    pass


class AmoApiError(AmohookError):
    """amoCRM answered with an error; carries its problem-JSON fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        title: str | None = None,
        detail: str | None = None,
        hint: str | None = None,
        validation_errors: list | None = None,
        url: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.title = title
        self.detail = detail
        self.hint = hint
        self.validation_errors = validation_errors or []
        self.url = url


class AmoTemporaryError(AmoApiError):
    """5xx, timeouts, dropped connections: the request may or may not have been processed."""

    exit_code = ExitCode.TEMPORARY


class MalformedAnswer(AmoTemporaryError):
    """amoCRM answered 2xx with a body that breaks its documented shape (a list for an object, a
    paging loop, a 414 for one id): amoCRM's fault, not ours — exit 4, and the next run reads again."""


class RateLimited(AmoTemporaryError):
    def __init__(self, message: str, *, retry_after: float | None = None, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class AccountBlocked(AmoApiError):
    """403 with an HTML body: amoCRM blocked API access after repeated rate-limit violations."""

    exit_code = ExitCode.BLOCKED


class Unauthorized(AmoApiError, ReauthRequired):
    """401 from the API even after one refresh: only a new authorization helps."""

    exit_code = ExitCode.REAUTH


class RefusedBeforeRefresh(AmoApiError):
    """401 to a write whose caller asked not to repeat it: the token is now refreshed and nothing
    was created, so the caller may send it again when it is sure it still owns the work."""


class Forbidden(AmoApiError):
    """403 with a JSON body: the token's user lacks the right (e.g. /users needs an admin), or the
    account refuses this IP (code 113). Retrying cannot help: a person grants the right."""

    exit_code = ExitCode.USAGE


class PaymentRequired(AmoApiError):
    """402: the account is not paid or its subscription is over; only its owner can fix that.
    https://www.amocrm.ru/developers/content/crm_platform/error-codes"""

    exit_code = ExitCode.USAGE


class ValidationFailed(AmoApiError):
    """400 with amoCRM's ``validation-errors``."""


class OAuthError(AmoApiError):
    """The token endpoint refused a grant; the message explains the fix."""

    exit_code = ExitCode.USAGE


class RefreshOutcomeUnknown(AmoTemporaryError):
    """The token request was sent but no answer came back: the old refresh token may be spent.

    Never re-sent automatically (refresh tokens are single-use); the message says what to do.
    """

    what: str = ""  # what happened instead of an answer (a timeout, an HTML page)


def needs_person(exc: BaseException) -> bool:
    """True when only a person can make the next try succeed: the grant is revoked, expired or
    missing (a new `amohook init-auth`), amoCRM blocked the account's API access, or the account is
    not paid. Retrying
    sooner cannot help, so callers wait long and say so once instead of hammering amoCRM."""
    return isinstance(exc, (ReauthRequired, AccountBlocked, PaymentRequired))


def definitely_refused(exc: BaseException) -> bool:
    """Did amoCRM answer in a way that proves it created nothing? Only a 4xx (429 included) does."""
    status = getattr(exc, "status", None)
    return isinstance(exc, AmoApiError) and status is not None and 400 <= status < 500


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of the exception's message (an ``AmohookError``'s own message), at most
    ``limit`` characters; the type's name when there is no message. For a sentence that already
    says what failed; ``describe`` adds the type."""
    text = (getattr(exc, "message", None) or str(exc)).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def describe(exc: BaseException) -> str:
    """The exception's type and the first line of its message, at most 200 characters: enough
    for a log line, never a multi-line driver dump."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__
