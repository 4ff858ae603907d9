"""The dashboard's per-minute history: what the processes counted in each minute, kept
in Redis for a few hours (as Sidekiq keeps its daily figures), read back for the
charts of the last hour.

Mechanism: every api and worker process already counts what the charts show, for
Prometheus (``app.metrics``: accepted, delivered, retried, dead-lettered, the
lateness histogram). A :class:`HistoryRecorder` reads those totals every
``FLUSH_S`` seconds and adds what grew since its last flush to the minute's hash
(``Keyspace.history``) in one pipeline: an HINCRBY per field that grew, then an
EXPIRE. The hot paths (the accept, ack and fail scripts, the ingest handler, the
worker's loop) do nothing more than before; a process adds one round trip every
five seconds, and none while it counted nothing.

Timing: flushes fall on wall-clock multiples of ``FLUSH_S`` (which divides a
minute), so what one flush carries was counted within one minute, the minute it
is filed under. A flush that fails (Redis down) leaves the counts to the next one,
which files them under its own minute: late, not lost. Each process uses its own
clock; the charts are as right as the hosts' clocks agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from redis.exceptions import RedisError

from app import metrics
from app.backoff import describe
from app.log import get_logger
from app.store.keys import Keyspace

log = get_logger("history")

FLUSH_S = 5.0  # divides 60: one flush's counts lie within one minute
KEEP_S = 3 * 3600  # each minute's hash expires this long after its last write
FIELDS = ("accepted", "delivered", "failed", "dead")
LATE = "late:"  # field prefix of a lateness bucket: late:<upper bound in seconds>
FINAL_FLUSH_S = 1.0  # at shutdown, how long the last flush may take


def minute_of(seconds: float) -> int:
    return int(seconds // 60)


@dataclass(frozen=True, slots=True)
class Minute:
    """What was counted in one minute, by every process that flushed into it."""

    start: int  # epoch seconds
    accepted: int = 0
    delivered: int = 0
    failed: int = 0  # handler failures sent to a retry
    dead: int = 0  # messages dead-lettered (deliveries exhausted, or undecodable)
    # (upper bound in seconds, messages handled that late) per bucket, ascending
    lateness: tuple[tuple[float, int], ...] = ()

    def lateness_quantile(self, q: float) -> float | None:
        """The ``q`` quantile of lateness, seconds, interpolated inside its bucket as
        Prometheus' ``histogram_quantile`` does (so the chart and a Grafana panel agree);
        None when nothing was handled. In the last, unbounded bucket it is that bucket's
        lower bound."""
        return quantile(self.lateness, q)


def quantile(buckets: tuple[tuple[float, int], ...], q: float) -> float | None:
    total = sum(count for _, count in buckets)
    if total == 0:
        return None
    rank = q * total
    seen, lower = 0, 0.0
    for upper, count in buckets:
        if count and seen + count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
        lower = upper
    return lower


def parse_minute(
    start: int, fields: Mapping[bytes, bytes], bounds: tuple[float, ...] = metrics.LATENESS.bounds
) -> Minute:
    """A minute from its hash. A flush writes only the buckets that grew: the others of
    ``bounds`` (the lateness histogram's) count 0, so a quantile knows each bucket's lower
    bound (that of the unbounded one above all)."""
    counts: dict[str, int] = {}
    lateness: dict[float, int] = dict.fromkeys(bounds, 0)
    for raw_name, raw_value in fields.items():
        name = raw_name.decode("utf-8", "replace")
        try:
            value = int(raw_value)
        except ValueError:
            continue  # not ours: skipped, not fatal
        if name in FIELDS:
            counts[name] = value
        elif name.startswith(LATE):
            try:
                lateness[float(name[len(LATE) :])] = value
            except ValueError:
                continue
    return Minute(start=start, lateness=tuple(sorted(lateness.items())), **counts)


async def read_history(client, prefix: str, now: float, minutes: int = 60) -> list[Minute]:
    """The last ``minutes`` minutes up to the one holding ``now`` (epoch seconds), oldest
    first, in one round trip; a minute nobody counted in is all zeros."""
    keys = Keyspace(prefix)
    last = minute_of(now)
    numbers = range(last - minutes + 1, last + 1)
    async with client.pipeline(transaction=False) as pipe:
        for number in numbers:
            pipe.hgetall(keys.history(number))
        replies = await pipe.execute()
    return [
        parse_minute(number * 60, reply or {})
        for number, reply in zip(numbers, replies, strict=True)
    ]


class HistoryRecorder:
    """Files what this process counted into the per-minute history.

    :param client: the process' Redis (or Redis Cluster) client.
    :param prefix: EAT_PREFIX: the keys are ``{<prefix>}:history:<minute>``.
    :param totals: this process' running totals, field -> count (default: its metrics);
        what they hold when the recorder is made is not filed.
    :param clock: epoch seconds (tests pass their own).
    :param interval: seconds between two flushes; a divisor of 60.
    """

    def __init__(
        self,
        client,
        prefix: str,
        totals: Callable[[], Mapping[str, float]] = metrics.history_totals,
        clock: Callable[[], float] = time.time,
        interval: float = FLUSH_S,
    ) -> None:
        if not (interval > 0 and (60 / interval).is_integer()):
            raise ValueError("interval must divide a minute")
        self.client = client
        self.keys = Keyspace(prefix)
        self.totals = totals
        self.clock = clock
        self.interval = interval
        # The totals as of the last flush that succeeded; from the start, what the process
        # counts from now on (a process' counters start at 0, so this loses nothing; a
        # test process running many apps files each one's own counts only).
        self._filed: dict[str, float] = dict(totals())
        self._failing = False

    async def flush(self, minute: int | None = None) -> int:
        """Add what grew since the last flush to ``minute`` (default: the current one);
        how many fields grew. A RedisError leaves it all for the next flush."""
        now = dict(self.totals())
        grown = {
            name: int(value - self._filed.get(name, 0.0))
            for name, value in now.items()
            if value - self._filed.get(name, 0.0) >= 1
        }
        if grown:
            key = self.keys.history(minute_of(self.clock()) if minute is None else minute)
            async with self.client.pipeline(transaction=False) as pipe:
                for name, amount in grown.items():
                    pipe.hincrby(key, name, amount)
                pipe.expire(key, KEEP_S)
                await pipe.execute()
        self._filed = now
        return len(grown)

    async def run(self, stopping: asyncio.Event) -> None:
        """Flush on every multiple of ``interval`` until ``stopping``; then the owner calls
        :meth:`close` once what it still counts at shutdown is counted."""
        while not stopping.is_set():
            now = self.clock()
            tick = (math.floor(now / self.interval) + 1) * self.interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), max(0.0, tick - now))
            if stopping.is_set():
                break
            # Counted during [tick - interval, tick): the minute that interval lies in.
            await self._flush_logged(minute_of(tick - self.interval / 2))

    async def close(self) -> None:
        """The last flush, at most FINAL_FLUSH_S seconds (Redis may be gone by then)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flush_logged(None), FINAL_FLUSH_S)

    async def _flush_logged(self, minute: int | None) -> None:
        try:
            await self.flush(minute)
        except (RedisError, OSError) as exc:
            if not self._failing:
                log.warning("history not recorded, retrying", error=describe(exc))
            self._failing = True
            return
        if self._failing:
            log.info("history recorded again")
        self._failing = False
