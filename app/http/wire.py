"""Bodies of the HTTP API as msgspec structs: plain data, no I/O.

The lifecycle routes decode requests and encode responses with these, and
``app.http.openapi`` documents the API from the same structs (``msgspec.json.schema``),
so the document cannot drift from what the code sends. Optional members use
``UNSET``: absent from the JSON rather than null.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from app.model import RUN_AT_MAX, RUN_AT_MIN

RunAt = Annotated[
    int,
    Meta(
        ge=RUN_AT_MIN,
        le=RUN_AT_MAX,
        description="Epoch milliseconds (0 .. 9999-12-31). Passed or now means due now; "
        "Redis' clock decides.",
    ),
]
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
Uuid = Annotated[str, Meta(pattern=UUID_PATTERN, description="Canonical UUID, stored lower-case.")]
Target = Annotated[
    str,
    Meta(
        max_length=2048,
        description="The URL the webhook handler POSTs this message to (http or https; "
        "EAT_WEBHOOK_ALLOW decides which; see docs/webhooks.md). Absent: EAT_WEBHOOK_URL.",
    ),
]
StateName = Literal["scheduled", "queued", "delivered", "retrying", "dead", "cancelled"]
BULK_MAX_ITEMS = 1000  # items in one POST /api/v1/save-messages
DEAD_PAGE_DEFAULT = 100
DEAD_PAGE_MAX = 1000
RESCHEDULE_BODY_LIMIT = 1024  # bytes: {"runAt": <15 digits>} with room for whitespace


# --- errors ----------------------------------------------------------------------------------


class ErrorBody(msgspec.Struct):
    """Every error: what went wrong, and the field it concerns (null: the whole request)."""

    error: str
    field: str | None


class ConflictBody(msgspec.Struct):
    """409: the message is not in a state that allows the change; ``state`` says which it is in."""

    error: str
    field: str | None
    state: StateName


# --- messages --------------------------------------------------------------------------------


class SaveMessageBody(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /api/v1/save-message``, and one item of ``POST /api/v1/save-messages``.

    (Documentation of ``app.model.SaveMessage``, which decodes it, with its limits.)
    """

    message: Annotated[str, Meta(description="At most EAT_MAX_MESSAGE_BYTES of UTF-8.")]
    runAt: RunAt
    uuid: Uuid | None = None
    target: Target | None = None


class Saved(msgspec.Struct):
    """A message as accepted (201) or as stored before (200, ``duplicate``: true)."""

    uuid: str
    runAt: int
    state: StateName
    duplicate: bool | UnsetType = UNSET


class LegacyMessage(msgspec.Struct):
    """A message as the original service echoed it back."""

    message: str
    runAt: int
    uuid: str


class LegacySaved(msgspec.Struct):
    """``EAT_LEGACY_HTTP``: the original service's answer to save-message, key for key."""

    message: LegacyMessage
    ok: bool


class MessageRef(msgspec.Struct):
    """A message after a change: its uuid, runAt and state."""

    uuid: str
    runAt: int
    state: StateName


class MessageStatus(msgspec.Struct):
    """``GET /api/v1/messages/{uuid}``."""

    uuid: str
    state: StateName
    runAt: int
    attempts: Annotated[int, Meta(description="Handler runs so far (failed or acknowledged).")]
    acceptedAt: int
    updatedAt: int
    transitions: Annotated[
        dict[str, int],
        Meta(description="Each state the message went through -> epoch ms it last entered it."),
    ]
    target: Annotated[
        str | UnsetType,
        Meta(
            description="The webhook target the message names, while the service holds its "
            "body (scheduled, retrying, queued, dead); absent otherwise."
        ),
    ] = UNSET


class Reschedule(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``PATCH /api/v1/messages/{uuid}``."""

    runAt: RunAt


# --- bulk ------------------------------------------------------------------------------------


class BulkEnvelope(msgspec.Struct, forbid_unknown_fields=True):
    """``{"messages": [...]}``, the other accepted shape of a bulk body."""

    messages: list[msgspec.Raw]


class BulkItem(msgspec.Struct):
    """The outcome of one item, by its ``index`` in the request."""

    index: int
    status: Literal["accepted", "duplicate", "invalid"]
    uuid: str | UnsetType = UNSET
    runAt: int | UnsetType = UNSET
    state: StateName | UnsetType = UNSET
    error: str | UnsetType = UNSET
    field: str | UnsetType | None = UNSET


class BulkResult(msgspec.Struct):
    results: list[BulkItem]
    accepted: int
    duplicates: int
    invalid: int


# --- dead letters ----------------------------------------------------------------------------


class DeadItem(msgspec.Struct, rename="camel"):
    """One dead-stream entry. A member the entry lacks is null."""

    id: Annotated[str, Meta(description="Dead-stream entry id; the paging cursor.")]
    uuid: str | None
    message: str | None
    run_at: int | None
    attempts: int | None
    reason: str | None
    dead_at: int | None
    target: Annotated[
        str | UnsetType | None,
        Meta(description="The webhook target the message names; absent when none."),
    ] = UNSET
    partition: Annotated[
        int | UnsetType,
        Meta(description="The partition whose dead stream holds it (with EAT_PARTITIONS > 1)."),
    ] = UNSET


class DeadPage(msgspec.Struct):
    items: list[DeadItem]
    next: Annotated[
        str | None,
        Meta(
            description="Pass as `cursor` for the next page; null on the last one. The last "
            "entry's id (`<ms>-<seq>`), with EAT_PARTITIONS > 1 followed by `-<partition>`."
        ),
    ]


class Replayed(msgspec.Struct):
    uuid: str
    state: Literal["queued"]


class ReplayedAll(msgspec.Struct):
    replayed: int
    skipped: Annotated[
        int,
        Meta(
            description="Entries left in place: their uuid has a live record, or they lack "
            "the fields of a message."
        ),
    ]


class DeletedOne(msgspec.Struct):
    uuid: str
    deleted: bool


class DeletedAll(msgspec.Struct):
    deleted: int


# --- stats -----------------------------------------------------------------------------------


# Built from the store's figures (``app.store.lifecycle``) by attribute name; the wire
# spells them in camelCase.


class ConsumerStats(msgspec.Struct, rename="camel"):
    name: str
    pending: int
    idle_ms: int


class LeaderInfo(msgspec.Struct, rename="camel"):
    identifier: str
    epoch: int
    since: Annotated[int, Meta(description="Epoch ms this leader first promoted with this epoch.")]


class PartitionStats(msgspec.Struct, rename="camel"):
    """One partition's figures (``GET /api/v1/stats`` with EAT_PARTITIONS > 1)."""

    partition: int
    delayed: int
    stream_length: int
    pending: int
    lag: int
    dead: int
    oldest_overdue_ms: int | None
    master: Annotated[
        str | None,
        Meta(description="host:port of the Redis Cluster master serving it; null on one Redis."),
    ]


class Stats(msgspec.Struct, rename="camel"):
    delayed: Annotated[int, Meta(description="Messages in the sorted set (scheduled, retrying).")]
    stream_length: Annotated[int, Meta(description="Entries in the stream, not yet acknowledged.")]
    pending: Annotated[int, Meta(description="Entries delivered to a worker, not acknowledged.")]
    lag: Annotated[int, Meta(description="Entries no worker has read yet.")]
    dead: int
    consumers: list[ConsumerStats]
    leader: Annotated[
        LeaderInfo | None, Meta(description="Null when no scheduler promoted in the last seconds.")
    ]
    oldest_overdue_ms: Annotated[
        int | None,
        Meta(description="How long the earliest delayed message is past due; null if none."),
    ]
    partitions: Annotated[
        list[PartitionStats] | UnsetType,
        Meta(
            description="Each partition's figures, in partition order (with EAT_PARTITIONS > 1; "
            "the figures above are their sums, the oldest overdue their largest)."
        ),
    ] = UNSET
    schedules: Annotated[
        int | UnsetType,
        Meta(
            description="Recurring schedules defined (docs/schedules.md); absent when none is, "
            "so the figures of a deployment without schedules read as before."
        ),
    ] = UNSET


# --- health ----------------------------------------------------------------------------------


class Health(msgspec.Struct):
    status: str


class Ready(msgspec.Struct):
    status: Literal["ok", "unavailable"]
    redis: bool
    memory_policy: bool  # false: Redis' maxmemory-policy may evict this service's data
