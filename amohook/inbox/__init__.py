"""The durable inbox: deliveries and their events, the group-commit writer, and the queue.

The receive path only stores: ``GroupCommitter`` (group_commit.py) takes what request threads hand
it and commits it in batches (one transaction, one fsync per batch, receive.py) before any request
is answered. The worker path only processes: ``claim`` leases due events, ``complete``/``fail``
finish them if the lease is still ours, ``release`` gives back what was claimed but not started
(queue.py). Operators read counts and listings (queries.py). They meet in the ``event`` table.

Times are Unix seconds (float), as everywhere in the store. The names below are re-exported so
``from amohook.inbox import X`` keeps working; new code may import from the modules themselves.
"""

from amohook.inbox.group_commit import CommitHealth, GroupCommitter
from amohook.inbox.queries import EventDetail, QueueStats, event_detail, list_events, queue_stats
from amohook.inbox.queue import (
    InboxEvent,
    ReplayResult,
    claim,
    complete,
    due_condition,
    fail,
    release,
    renew,
    replay,
)
from amohook.inbox.receive import (
    CHECKPOINT_SECONDS,
    ERROR_MAX,
    FAILURE_HINTS,
    FAILURE_LOG_SECONDS,
    HEADER_MAX,
    INSERT_CHUNK,
    STATEMENT_BYTES,
    USEFUL_HEADERS,
    Incoming,
    Stored,
    StoreUnavailable,
    check_storable,
    driver_errors_as_peewee,
    failure_class,
    store_deliveries,
    store_in_txn,
    unmask,
    useful_headers,
)

__all__ = [
    "CHECKPOINT_SECONDS",
    "ERROR_MAX",
    "FAILURE_HINTS",
    "FAILURE_LOG_SECONDS",
    "HEADER_MAX",
    "INSERT_CHUNK",
    "STATEMENT_BYTES",
    "USEFUL_HEADERS",
    "CommitHealth",
    "EventDetail",
    "GroupCommitter",
    "InboxEvent",
    "Incoming",
    "QueueStats",
    "ReplayResult",
    "Stored",
    "StoreUnavailable",
    "check_storable",
    "claim",
    "complete",
    "driver_errors_as_peewee",
    "due_condition",
    "event_detail",
    "fail",
    "failure_class",
    "list_events",
    "queue_stats",
    "release",
    "renew",
    "replay",
    "store_deliveries",
    "store_in_txn",
    "unmask",
    "useful_headers",
]
