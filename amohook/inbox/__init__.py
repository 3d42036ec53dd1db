"""The durable inbox: deliveries and their events, the group-commit writer, and the queue.

The receive path only stores: ``GroupCommitter`` (group_commit.py) takes what request threads hand
it and commits it in batches (one transaction, one fsync per batch, receive.py) before any request
is answered. The worker path only processes: ``claim`` leases due events, ``complete``/``fail``
finish them if the lease is still ours, ``release`` gives back what was claimed but not started
(queue.py). Operators read counts and listings (queries.py). They meet in the ``event`` table.

Times are Unix seconds (float), as everywhere in the store. The names below are what the rest of
amohook uses; everything else stays inside the modules.
"""

from amohook.inbox.group_commit import GroupCommitter, ticket_outcome
from amohook.inbox.queries import QueueStats, event_detail, list_events, queue_stats
from amohook.inbox.queue import InboxEvent, claim, complete, fail, release, renew, replay
from amohook.inbox.receive import (
    Incoming,
    StoreUnavailable,
    check_storable,
    failure_class,
    store_deliveries,
    useful_headers,
)

__all__ = [
    "GroupCommitter",
    "InboxEvent",
    "Incoming",
    "QueueStats",
    "StoreUnavailable",
    "check_storable",
    "claim",
    "complete",
    "event_detail",
    "fail",
    "failure_class",
    "list_events",
    "queue_stats",
    "release",
    "renew",
    "replay",
    "store_deliveries",
    "ticket_outcome",
    "useful_headers",
]
