"""Slowing down password guessing on ``/status`` and ``/metrics``, per client address.

Without it a listener on the internet took about 1,450 guesses a second from 16 clients, each
written to the log. Here an address gets ``FREE`` failed tries; after that each failure bars it
for twice as long as the last (1 s, 2 s, 4 s … at most ``MAX_DELAY``), and while it is barred the
event loop answers 429 with ``Retry-After`` without reading the password or taking a thread (a
barred address cannot test a guess, right or wrong). A success, or ``QUIET`` without a failure,
clears the address. IPv6 clients are counted per /64, the block one subscriber usually gets.

Failures are not logged one by one: at most one line per ``LOG_EVERY`` sums them up (WARNING once
an address was barred: someone is guessing). Behind a reverse proxy every client has the proxy's
address, so a guesser bars everyone's access to the pages for a while (never the webhooks).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("amohook.server")

FREE = 10  # failed tries before an address is slowed down (a person mistyping stays below)
MAX_DELAY = 900.0  # the longest bar, seconds
QUIET = 900.0  # an address without a failure for this long starts afresh
MAX_CLIENTS = 4096  # addresses remembered; the one idle longest is forgotten first
LOG_EVERY = 60.0


@dataclass
class _Client:
    failures: int = 0
    last: float = 0.0
    barred_until: float = 0.0


def client_key(address: str) -> str:
    """The address failures are counted under: an IPv4 address, an IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class LoginThrottle:
    """Failed-password bookkeeping shared by the event loop (``retry_after``) and the handler
    threads (``failed``, ``succeeded``); every call is a dictionary lookup under a lock."""

    def __init__(
        self,
        *,
        free: int = FREE,
        max_delay: float = MAX_DELAY,
        quiet: float = QUIET,
        max_clients: int = MAX_CLIENTS,
        log_every: float = LOG_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.free, self.max_delay, self.quiet, self.max_clients = free, max_delay, quiet, max_clients
        self.log_every, self.clock = log_every, clock
        self._clients: collections.OrderedDict[str, _Client] = collections.OrderedDict()
        self._lock = threading.Lock()
        # What the next summary line reports: failures, barred answers, addresses, barred addresses.
        self._failures = self._refused = 0
        self._seen: set[str] = set()
        self._barred: set[str] = set()
        self._since = clock() - log_every  # the first failure is told at once

    def retry_after(self, address: str) -> int:
        """Seconds ``address`` must still wait (0: it may try); counts a refusal when it must."""
        key = client_key(address)
        with self._lock:
            client = self._clients.get(key)
            now = self.clock()
            if client is None or client.barred_until <= now:
                return 0
            self._refused += 1
            self._seen.add(key)
            self._summarize(now)
            return max(1, math.ceil(client.barred_until - now))

    def failed(self, address: str) -> None:
        key = client_key(address)
        with self._lock:
            now = self.clock()
            client = self._clients.pop(key, None)
            if client is None or now - client.last > self.quiet:
                client = _Client()
            self._clients[key] = client  # the most recent failure last
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
            client.failures += 1
            client.last = now
            over = client.failures - self.free
            if over > 0:
                client.barred_until = now + min(self.max_delay, 2.0 ** (over - 1))
                self._barred.add(key)
            self._failures += 1
            self._seen.add(key)
            self._summarize(now)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._clients.pop(client_key(address), None)

    def _summarize(self, now: float) -> None:
        """One line for what happened since the last one, at most every ``log_every`` seconds."""
        if now - self._since < self.log_every or not (self._failures or self._refused):
            return
        level = logging.WARNING if self._barred else logging.INFO
        log.log(
            level,
            "status pages: %d failed password attempt(s) and %d answered 429 (too many failures) from %d "
            "address(es) in the last %.0f s%s",
            self._failures,
            self._refused,
            len(self._seen),
            now - self._since,
            f"; {len(self._barred)} address(es) slowed down (someone guessing the password?)" if self._barred else "",
        )
        self._failures = self._refused = 0
        self._seen.clear()
        self._barred.clear()
        self._since = now

    def tick(self) -> None:
        """Write the summary when it is due (the event loop calls this often: a last failure is
        told within ``log_every`` even if nothing follows it)."""
        with self._lock:
            self._summarize(self.clock())

    def flush(self) -> None:
        """Write the summary of what is not written yet (when the listener stops)."""
        with self._lock:
            self._since -= self.log_every
            self._summarize(self.clock())
