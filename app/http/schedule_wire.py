"""Bodies of the schedule routes (``/api/v1/schedules``) as msgspec structs, like
``app.http.wire``: the routes encode with them and the OpenAPI document is built from them."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from app.http.wire import RunAt, StateName, Uuid
from app.recurrence import NAME_MAX

SCHEDULE_PAGE_DEFAULT = 100
SCHEDULE_PAGE_MAX = 1000
NEXT_SHOWN = 5  # next occurrences GET /schedules/{name} lists
PRODUCED_SHOWN = 5  # produced messages it lists
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
Name = Annotated[
    str,
    Meta(
        pattern=NAME_PATTERN,
        max_length=NAME_MAX,
        description="Letters, digits, '.', '_', ':' and '-', starting with a letter or digit.",
    ),
]


class ScheduleBody(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``PUT /api/v1/schedules/{name}``: exactly one of ``cron`` and ``every``."""

    message: Annotated[str, Meta(description="The body of every message the schedule produces.")]
    cron: (
        Annotated[
            str,
            Meta(
                description="5 fields (minute hour day-of-month month day-of-week), read in "
                "`timezone`. Daylight saving: docs/schedules.md."
            ),
        ]
        | None
    ) = None
    every: (
        Annotated[
            str,
            Meta(
                pattern=r"^[0-9]{1,12}(ms|s|m|h|d)$",
                description="A fixed interval: 90s, 5m, 1h, 1d; at least "
                "EAT_SCHEDULE_MIN_INTERVAL.",
            ),
        ]
        | None
    ) = None
    timezone: (
        Annotated[str, Meta(description="IANA zone of the cron expression (default UTC).")] | None
    ) = None
    startAt: RunAt | None = None
    endAt: RunAt | None = None
    paused: bool = False


class Produced(msgspec.Struct):
    """One occurrence the schedule produced, and its message's state now (null: its record
    is gone after the retention window, or the catch-up rule skipped it)."""

    uuid: Uuid
    runAt: int
    state: StateName | None


class ScheduleView(msgspec.Struct, omit_defaults=True):
    """A schedule: its definition and where the leader is with it."""

    name: Name
    message: str
    timezone: str
    paused: bool
    generation: Annotated[
        int, Meta(description="Changes when the definition does (an identical PUT keeps it).")
    ]
    createdAt: Annotated[int, Meta(description="When this generation was stored, epoch ms.")]
    materialisedThrough: Annotated[
        int,
        Meta(
            description="The last occurrence the leader turned into a message (or skipped), "
            "epoch ms; createdAt before the first."
        ),
    ]
    cron: str | UnsetType = UNSET
    every: str | UnsetType = UNSET
    startAt: int | UnsetType = UNSET
    endAt: int | UnsetType = UNSET
    outcome: (
        Annotated[
            Literal["created", "replaced", "unchanged"],
            Meta(description="What a PUT did (only in its answer)."),
        ]
        | UnsetType
    ) = UNSET
    next: (
        Annotated[list[int], Meta(description=f"The next {NEXT_SHOWN} occurrences, epoch ms.")]
        | UnsetType
    ) = UNSET
    produced: (
        Annotated[
            list[Produced],
            Meta(description=f"The last {PRODUCED_SHOWN} occurrences materialised, newest first."),
        ]
        | UnsetType
    ) = UNSET


class SchedulePage(msgspec.Struct):
    items: list[ScheduleView]
    next: Annotated[
        str | None, Meta(description="The `cursor` of the next page; null on the last.")
    ]
    unreadable: Annotated[
        list[str],
        Meta(
            description="Names on this page whose stored definitions this release cannot "
            "read (not in `items`, not run): replace or delete them."
        ),
    ] = []


class ScheduleDeleted(msgspec.Struct):
    name: Name
    deleted: bool
