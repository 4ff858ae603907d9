"""The storage core: the keyspace, the record format, the Lua scripts and the thin
Redis client that calls them. No HTTP, no CLI, no policy about when to call what.

Callers import from here; the modules inside import each other directly.
"""

from app.store.client import OutcomeUnknown, StoreCluster, StoreRedis, connect, open_client
from app.store.store import (
    LEADER_TTL_MS,
    Accepted,
    CorruptEntry,
    Delivery,
    Promoted,
    QueueStats,
    StorageFormatError,
    Store,
    encode_epoch,
    group_missing,
    parse_entry,
)

__all__ = [
    "LEADER_TTL_MS",
    "Accepted",
    "CorruptEntry",
    "Delivery",
    "OutcomeUnknown",
    "Promoted",
    "QueueStats",
    "StorageFormatError",
    "Store",
    "StoreCluster",
    "StoreRedis",
    "connect",
    "encode_epoch",
    "group_missing",
    "open_client",
    "parse_entry",
]
