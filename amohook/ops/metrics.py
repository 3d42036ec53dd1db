"""``GET /metrics``: the listener's figures in the Prometheus text format.

Three kinds of figures, and where each comes from:

- counted in memory by this process since it started (``ListenerMetrics``): webhook answers by
  status code, the group-commit writer's batches and their latency; and, from the modules that
  count them, the events this process's worker threads ran (``worker.outcome_counts``) and the
  amoCRM requests and 429s of this process's clients (``amocrm.client.api_counts``). Another
  process (`amohook worker` elsewhere, cron's `refresh-token`) counts its own and is not seen here;
  a restart starts them at zero, which Prometheus's ``rate()`` expects of counters.
- read from the store by the overview thread (``overview.Snapshot``, at most every few seconds):
  events and actions by status, the queue, token expiry, reconciliation lag — the same for every
  process, whichever one is asked.
- the listener's state now: connections held, deliveries waiting for the writer.

The format is written by ``prometheus_client`` (its own registry, never the global one), which
escapes label values — account names come from outside.
"""

from __future__ import annotations

import bisect
import threading
import time

# Seconds one group commit takes (one transaction for a batch of deliveries, retries included):
# a few ms on SQLite with fsync, more on a server database; amoCRM's whole budget is 2 s.
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ListenerMetrics:
    """Counts kept by the listener itself; each update is a dict bump or a list index under a lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self._webhooks: dict[str, int] = {}
        self._buckets = [0] * (len(COMMIT_BUCKETS) + 1)  # the last one is +Inf
        self._commit_sum = 0.0
        self._commit_count = 0
        self.started_at = time.time()

    def webhook_answered(self, status: int | None) -> None:
        """One POST to the webhook route answered with ``status`` (None: no answer, the handler failed)."""
        code = str(status) if status is not None else "none"
        with self._lock:
            self._webhooks[code] = self._webhooks.get(code, 0) + 1

    def observe_commit(self, deliveries: int, seconds: float) -> None:
        """The writer committed a batch (``GroupCommitter(on_batch=...)``)."""
        i = bisect.bisect_left(COMMIT_BUCKETS, seconds)
        with self._lock:
            self._buckets[i] += 1
            self._commit_sum += seconds
            self._commit_count += 1

    def webhooks(self) -> dict[str, int]:
        with self._lock:
            return dict(self._webhooks)

    def commit_histogram(self) -> tuple[list[tuple[str, int]], float]:
        """(cumulative buckets as Prometheus wants them, sum of seconds)."""
        with self._lock:
            counts, total = list(self._buckets), self._commit_sum
        cumulative, running = [], 0
        for bound, count in zip([*map(str, COMMIT_BUCKETS), "+Inf"], counts, strict=True):
            running += count
            cumulative.append((bound, running))
        return cumulative, total


def render(
    listener: ListenerMetrics,
    *,
    snapshot,
    read_error: str | None,
    committer,
    connections: int,
    runtime: dict | None = None,
    now: float | None = None,
) -> bytes:
    """The whole exposition, for one scrape; ``snapshot`` may be None (the store cannot be read)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        _Collector(
            listener, snapshot, read_error, committer, connections, runtime or {}, time.time() if now is None else now
        )
    )
    return generate_latest(registry)


# The classic text format, which every Prometheus reads (our names need none of 1.0.0's escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Collector:
    def __init__(self, listener, snapshot, read_error, committer, connections, runtime, now):
        self.listener = listener
        self.runtime = runtime
        self.snapshot = snapshot
        self.read_error = read_error
        self.committer = committer
        self.connections = connections
        self.now = now

    def collect(self):
        yield from self._memory()
        yield from self._process_wide()
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(
            "amohook_store_read_ok",
            "1 when the last read of the store worked",
            value=0 if self.read_error or self.snapshot is None else 1,
        )
        if self.snapshot is not None:
            yield from self._store(self.snapshot)

    def _memory(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        webhooks = CounterMetricFamily(
            "amohook_webhooks",
            "POSTs to the webhook route by the status answered (200: stored; 4xx refused; "
            "503: not stored, amoCRM retries); this process, since it started",
            labels=["code"],
        )
        for code, count in sorted(self.listener.webhooks().items()):
            webhooks.add_metric([code], count)
        yield webhooks
        buckets, total = self.listener.commit_histogram()
        commit = HistogramMetricFamily(
            "amohook_commit_seconds", "Time one group commit of webhook deliveries took (retries included)"
        )
        commit.add_metric([], buckets, total)
        yield commit
        yield CounterMetricFamily(
            "amohook_committed_deliveries", "Deliveries committed by the writer", value=self.committer.committed
        )
        health = self.committer.health()
        yield GaugeMetricFamily(
            "amohook_commits_failing",
            "1 while the writer's commits fail (webhooks get 503)",
            value=1 if health.failing else 0,
        )
        yield GaugeMetricFamily(
            "amohook_writer_queue", "Deliveries waiting for the writer", value=self.committer.queued()
        )
        yield GaugeMetricFamily("amohook_connections", "Connections the listener holds", value=self.connections)
        yield GaugeMetricFamily(
            "amohook_process_start_time_seconds",
            "When this listener started (Unix time)",
            value=self.listener.started_at,
        )

    def _process_wide(self):
        from prometheus_client.core import CounterMetricFamily

        processed = CounterMetricFamily(
            "amohook_events_processed",
            "Event attempts run by this process's worker threads, by outcome "
            "(ok, retry, dead, lost: its lease ran out)",
            labels=["outcome"],
        )
        for outcome, count in sorted((self.runtime.get("events_processed") or {}).items()):
            processed.add_metric([outcome], count)
        yield processed
        requests = CounterMetricFamily(
            "amohook_amocrm_requests", "Requests this process sent to amoCRM", labels=["account"]
        )
        limited = CounterMetricFamily(
            "amohook_amocrm_rate_limited", "amoCRM answers 429 to this process", labels=["account"]
        )
        for account, figures in sorted((self.runtime.get("amocrm") or {}).items()):
            requests.add_metric([account], figures["requests"])
            limited.add_metric([account], figures["rate_limited"])
        yield requests
        yield limited
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            "amohook_loop_up", "1 while the loop runs (0: restarting after a death, or dead)", labels=["loop"]
        )
        restarts = CounterMetricFamily(
            "amohook_loop_restarts", "Times the loop died and was started again", labels=["loop"]
        )
        for name, loop in sorted((self.runtime.get("loops") or {}).items()):
            up.add_metric([name], 1 if loop.get("state") == "running" else 0)
            restarts.add_metric([name], loop.get("restarts", 0))
        yield up
        yield restarts

    def _store(self, snap):
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(
            "amohook_store_read_age_seconds", "Age of the store figures below", value=max(0.0, self.now - snap.read_at)
        )
        events = GaugeMetricFamily(
            "amohook_events",
            "Events in the store by status (queue depth: pending, running; done until pruned)",
            labels=["status"],
        )
        for status, count in snap.events_by_status.items():
            events.add_metric([status], count)
        yield events
        yield GaugeMetricFamily("amohook_events_due", "Pending events due now", value=snap.queue.due)
        if snap.queue.oldest_pending_age is not None:
            yield GaugeMetricFamily(
                "amohook_oldest_pending_seconds", "Age of the oldest pending event", value=snap.queue.oldest_pending_age
            )
        actions = GaugeMetricFamily(
            "amohook_actions", "Rule actions (tasks, notes) in the store by status", labels=["status"]
        )
        for status, count in snap.actions_by_status.items():
            actions.add_metric([status], count)
        yield actions
        yield GaugeMetricFamily(
            "amohook_actions_done_today", "Tasks and notes created since local midnight", value=snap.today_total
        )
        yield from self._accounts(snap)

    def _accounts(self, snap):
        from prometheus_client.core import GaugeMetricFamily

        expiry = GaugeMetricFamily(
            "amohook_token_expires_in_seconds",
            "Seconds until the stored access token expires (negative: expired)",
            labels=["account"],
        )
        age = GaugeMetricFamily(
            "amohook_refresh_token_age_seconds",
            "Age of the refresh token (amoCRM revokes one unused for 3 months)",
            labels=["account"],
        )
        lag = GaugeMetricFamily(
            "amohook_reconcile_lag_seconds", "How far behind now the events log has been read", labels=["account"]
        )
        last_pass = GaugeMetricFamily(
            "amohook_reconcile_last_pass_age_seconds", "Seconds since the last reconciliation pass", labels=["account"]
        )
        recovered = GaugeMetricFamily(
            "amohook_reconcile_recovered_24h",
            "Changes found only in the events log (their webhook never came) in 24 h",
            labels=["account"],
        )
        subscription = GaugeMetricFamily(
            "amohook_subscription_state",
            "The watchdog's last finding about the webhook subscription (1 for the current state)",
            labels=["account", "state"],
        )
        for view in snap.accounts:
            sub, token, rec = view.subdomain, view.token, view.reconcile
            if token.expires_at is not None:
                expiry.add_metric([sub], token.expires_at - self.now)
            if token.refresh_token_age is not None:
                age.add_metric([sub], token.refresh_token_age)
            if rec.lag is not None:
                lag.add_metric([sub], rec.lag)
            if rec.last_pass_at is not None:
                last_pass.add_metric([sub], max(0.0, self.now - rec.last_pass_at))
            recovered.add_metric([sub], rec.recovered_24h)
            subscription.add_metric([sub, rec.subscription], 1)
        yield from (expiry, age, lag, last_pass, recovered, subscription)
