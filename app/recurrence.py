"""Recurring schedules as plain data: a definition, its occurrences, their uuids. No I/O.

A schedule is either a cron expression read in a timezone (``cron`` + ``timezone``)
or a fixed interval (``every``), optionally bounded by ``startAt`` and ``endAt``
(epoch ms, both inclusive). Its occurrences are instants (epoch ms, UTC): the api
shows them, the leading scheduler materialises them as ordinary delayed messages.

**Cron** is parsed by cronsim (5 fields: minute hour day-of-month month
day-of-week; Debian cron's day-of-month/day-of-week rule). Daylight saving
follows Debian cron's rule, which cronsim implements:

- an expression at a fixed wall-clock time (neither its minute nor its hour field
  starts with ``*``, e.g. ``30 2 * * *``) runs once per local day: a time the
  clocks skip (02:30 on the spring-forward night in Europe/Berlin) runs at the
  first valid time after the gap (03:00 CEST), a time that occurs twice (02:30 on
  the fall-back night) runs once, at its first occurrence (02:30 CEST);
- an expression with a wildcard minute or hour (``*/15 * * * *``, ``0 * * * *``)
  follows elapsed time: it keeps its pace through the change, so the repeated hour
  has its quarter-hours twice and the skipped hour none.

**Intervals** (``every``: ``90s``, ``5m``, ``1h``, ``1d``, ``1500ms``) are
elapsed time, no timezone: occurrences at ``anchor + k * every``, where the anchor
is ``startAt`` when given, else one interval after the definition was stored.

The uuid of an occurrence is ``uuid5(NAMESPACE, name, generation, instant)``: the
same occurrence of the same definition is the same message, however often and by
whichever leader it is produced (the accept script keeps the first).
"""

from __future__ import annotations

import math
import re
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from cronsim import CronSim, CronSimError

from app.model import RUN_AT_MAX, RUN_AT_MIN, InvalidInput

# Fixed forever: changing it would give every occurrence a new uuid (a duplicate after
# an upgrade). uuid5(NAMESPACE_URL, "https://echo-at-time/schedules").
NAMESPACE = uuidlib.UUID("8a3e0c1e-4be0-5b8f-9c55-6f1f3a1b7a01")

# Letters, digits and . _ : - ; starting with a letter or digit; at most 128 characters.
# Safe in a URL path, a log line and a Redis hash field without escaping.
NAME_MAX = 128
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
CRON_MAX = 200  # characters of a cron expression
_EVERY = re.compile(r"([0-9]{1,12})(ms|s|m|h|d)\Z")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
EVERY_MAX_MS = 366 * 86_400_000  # a year and a day
# How many occurrences one call yields at most: bounds the work of one leader pass on one
# schedule (catch-up after a long outage continues on the next pass).
MAX_PER_CALL = 1000


class Definition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A schedule as stored: normalised, so two PUTs meaning the same thing encode to the
    same bytes (the store compares them to keep an identical PUT a no-op)."""

    message: str
    cron: str | None = None  # single spaces between fields
    every_ms: int | None = None
    timezone: str = "UTC"
    start_at: int | None = None
    end_at: int | None = None
    paused: bool = False


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Definition)


def encode(definition: Definition) -> bytes:
    return _encoder.encode(definition)


def decode(raw: bytes) -> Definition:
    return _decoder.decode(raw)


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise InvalidInput(
            f"name must be 1-{NAME_MAX} letters, digits, '.', '_', ':' or '-', starting with "
            "a letter or digit",
            "name",
        )
    return name


def parse_every(text: str, floor_ms: int) -> int:
    """``90s`` -> 90000; InvalidInput (field ``every``) below ``floor_ms`` or malformed."""
    match = _EVERY.match(text)
    if match is None:
        raise InvalidInput(
            "every must be a whole number and a unit: ms, s, m, h or d (e.g. 90s, 5m, 1h)",
            "every",
        )
    ms = int(match.group(1)) * _UNIT_MS[match.group(2)]
    if ms < floor_ms:
        raise InvalidInput(
            f"every must be at least {floor_ms} ms (EAT_SCHEDULE_MIN_INTERVAL)", "every"
        )
    if ms > EVERY_MAX_MS:
        raise InvalidInput("every must be at most 366d", "every")
    return ms


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; InvalidInput (field ``timezone``) for an unknown one."""
    if not name or len(name) > 64 or name.startswith(("/", ".")) or ".." in name:
        raise InvalidInput(f"unknown timezone: {name!r}", "timezone")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidInput(f"unknown timezone: {name!r}", "timezone") from None


def normalise_cron(expression: str) -> str:
    """The expression with single spaces; InvalidInput (field ``cron``) when cronsim refuses
    it, it has other than 5 fields, or it never fires."""
    fields = expression.split()
    if len(expression) > CRON_MAX or len(fields) != 5:
        raise InvalidInput(
            "cron must have 5 fields: minute hour day-of-month month day-of-week", "cron"
        )
    text = " ".join(fields)
    try:
        CronSim(text, datetime(2000, 1, 1, tzinfo=UTC))
    except (CronSimError, ValueError, LookupError, TypeError) as exc:
        raise InvalidInput(f"bad cron expression: {exc}", "cron") from None
    return text


def validate(
    *,
    message: str,
    cron: str | None,
    every: str | None,
    timezone: str | None,
    start_at: int | None,
    end_at: int | None,
    paused: bool,
    max_message_bytes: int,
    min_interval_ms: int,
) -> Definition:
    """A request's fields as a Definition, or InvalidInput naming the first bad field."""
    if (cron is None) == (every is None):
        raise InvalidInput(
            "give exactly one of cron and every", "every" if cron is not None else "cron"
        )
    try:
        size = len(message.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput("message is not valid Unicode (lone surrogate)", "message") from None
    if size > max_message_bytes:
        raise InvalidInput(
            f"message is {size} bytes; the limit is {max_message_bytes}", "message", 413
        )
    every_ms = None
    if cron is not None:
        cron = normalise_cron(cron)
        zone(timezone or "UTC")
    else:
        assert every is not None
        every_ms = parse_every(every, min_interval_ms)
        if timezone is not None:
            zone(timezone)  # an interval ignores it, but a wrong one is still a mistake
    for value, name in ((start_at, "startAt"), (end_at, "endAt")):
        if value is not None and (isinstance(value, bool) or not RUN_AT_MIN <= value <= RUN_AT_MAX):
            raise InvalidInput(
                f"{name} must be epoch milliseconds between {RUN_AT_MIN} and {RUN_AT_MAX}", name
            )
    if start_at is not None and end_at is not None and end_at < start_at:
        raise InvalidInput("endAt is before startAt", "endAt")
    definition = Definition(
        message=message,
        cron=cron,
        every_ms=every_ms,
        timezone=timezone or "UTC",
        start_at=start_at,
        end_at=end_at,
        paused=paused,
    )
    if cron is not None and next(iter(occurrences(definition, 0, 0, RUN_AT_MAX, 1)), None) is None:
        raise InvalidInput("the cron expression never fires", "cron")
    return definition


def every_text(ms: int) -> str:
    """The shortest ``every`` text for ``ms`` (``90s``, ``5m``, ``1500ms``)."""
    for unit in ("d", "h", "m", "s"):
        if ms % _UNIT_MS[unit] == 0:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms}ms"


def occurrences(
    definition: Definition, created_ms: int, after_ms: int, until_ms: int, limit: int
) -> Iterator[int]:
    """The definition's occurrences strictly after ``after_ms`` and at most ``until_ms``,
    in order, at most ``limit`` (and MAX_PER_CALL + 1) of them. ``created_ms`` is when this
    generation was stored (an interval without ``startAt`` counts from it)."""
    limit = min(limit, MAX_PER_CALL + 1)
    low = after_ms if definition.start_at is None else max(after_ms, definition.start_at - 1)
    high = until_ms if definition.end_at is None else min(until_ms, definition.end_at)
    if high <= low or limit <= 0:
        return
    if definition.every_ms is not None:
        yield from _interval(definition, created_ms, low, high, limit)
        return
    assert definition.cron is not None
    start = datetime.fromtimestamp(low / 1000, zone(definition.timezone))
    produced = 0
    try:
        for at in CronSim(definition.cron, start):
            ms = int(at.timestamp() * 1000)
            if ms > high:
                return
            if ms <= low:  # cronsim floors ``start`` to the second
                continue
            yield ms
            produced += 1
            if produced >= limit:
                return
    except (CronSimError, OverflowError, ValueError):
        return  # past the year cronsim or datetime can count to


def _interval(definition: Definition, created_ms: int, low: int, high: int, limit: int):
    every = definition.every_ms
    assert every is not None
    anchor = definition.start_at if definition.start_at is not None else created_ms + every
    k = 0 if low < anchor else (low - anchor) // every + 1
    for i in range(limit):
        at = anchor + (k + i) * every
        if at > high:
            return
        yield at


def previous(definition: Definition, created_ms: int, at_ms: int, count: int) -> list[int]:
    """Up to ``count`` occurrences at or before ``at_ms`` (and not before this generation was
    stored), newest first: which messages the schedule produced last."""
    floor = created_ms if definition.start_at is None else max(created_ms, definition.start_at)
    if definition.end_at is not None:
        at_ms = min(at_ms, definition.end_at)
    out: list[int] = []
    if at_ms < floor:
        return out
    if definition.every_ms is not None:
        every = definition.every_ms
        anchor = definition.start_at if definition.start_at is not None else created_ms + every
        if at_ms < anchor:
            return out
        last = anchor + (at_ms - anchor) // every * every
        while len(out) < count and last >= max(anchor, floor):
            out.append(last)
            last -= every
        return out
    assert definition.cron is not None
    start = datetime.fromtimestamp((at_ms + 1) / 1000, zone(definition.timezone))
    try:
        for when in CronSim(definition.cron, start, reverse=True):
            ms = int(when.timestamp() * 1000)
            if ms > at_ms:
                continue
            if ms < floor or len(out) >= count:
                break
            out.append(ms)
    except (CronSimError, OverflowError, ValueError):
        pass
    return out


def occurrence_uuid(name: str, generation: int, at_ms: int) -> str:
    """The uuid of one occurrence of one generation of a schedule."""
    return str(uuidlib.uuid5(NAMESPACE, f"{name}\n{generation}\n{at_ms}"))


@dataclass(frozen=True, slots=True)
class Plan:
    """What one leader pass produces for one schedule: ``produce`` (instants to accept as
    messages) and ``through`` (the last occurrence it considered, produced or skipped: the
    next pass starts after it). ``skipped`` counts missed occurrences the catch-up rule
    dropped."""

    produce: list[int]
    through: int
    skipped: int = 0
    # The first occurrence after the horizon: no pass need plan this schedule before it
    # enters the horizon (inf: none ever; 0: not known, plan it on the next pass).
    next_ms: float = 0


CATCHUP = ("latest", "all", "none")


def plan(
    definition: Definition,
    created_ms: int,
    last_ms: int,
    now_ms: int,
    horizon_ms: int,
    catchup: str,
) -> Plan:
    """The occurrences after ``last_ms`` (the last one materialised) up to ``now_ms +
    horizon_ms``. One due more than ``horizon_ms`` ago was missed (no leader materialised
    it ahead, as one always does while it runs): ``catchup`` decides: ``all`` produces
    every missed one, ``latest`` only the newest, ``none`` none. One due less than
    ``horizon_ms`` ago is produced regardless (late, not missed: a schedule created a
    moment before the pass, a short gap in leadership)."""
    cutoff = now_ms - horizon_ms
    until = now_ms + horizon_ms
    if catchup == "all":
        found, beyond = _upto(definition, created_ms, last_ms, until)
        return Plan(found, found[-1] if found else last_ms, 0, beyond)
    # latest or none: the missed ones are not walked one by one (a minutely schedule after
    # a month's outage has 43,200): one look back for the newest, one count (bounded).
    kept: list[int] = []
    skipped = 0
    if cutoff - 1 > last_ms:
        skipped = sum(
            1 for _ in occurrences(definition, created_ms, last_ms, cutoff - 1, MAX_PER_CALL)
        )
        if catchup == "latest" and skipped:
            kept = [at for at in previous(definition, created_ms, cutoff - 1, 1) if at > last_ms]
            skipped -= len(kept)
    start = max(last_ms, cutoff - 1)
    current, beyond = _upto(definition, created_ms, start, until)
    produce = kept + current
    through = current[-1] if current else (start if produce or skipped else last_ms)
    return Plan(produce, through, skipped, beyond)


def _upto(definition: Definition, created_ms: int, after_ms: int, until_ms: int):
    """The occurrences after ``after_ms`` up to ``until_ms`` (at most MAX_PER_CALL), and the
    first one after ``until_ms`` (see Plan.next_ms), from one walk of the expression."""
    found: list[int] = []
    for at in occurrences(definition, created_ms, after_ms, RUN_AT_MAX, MAX_PER_CALL + 1):
        if at > until_ms:
            return found, at
        if len(found) == MAX_PER_CALL:
            return found, 0
        found.append(at)
    return found, math.inf
