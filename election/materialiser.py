"""The schedule loop of the leading scheduler: turn the next occurrences of every schedule
into ordinary delayed messages (policy: when and how many; the mechanism is the accept
script and ``app.recurrence.plan``).

Once a second, while the leadership gate is open, one *pass*:

1. reads Redis' time and the definitions' version in one round trip (reloading every
   definition when the version moved: a PUT, DELETE, pause or resume);
2. for each schedule whose next occurrence falls within ``HORIZON_MS`` of that time,
   plans its occurrences after the last one materialised (``app.recurrence.plan``:
   the catch-up rule decides about those missed while no leader ran);
3. accepts them as messages whose uuids are ``occurrence_uuid(name, generation,
   instant)``, into their partitions (a repeat, by this leader after an error or by
   another after a failover, is a duplicate: nothing changes);
4. only then records how far it got (``schedule_progress.lua``, fenced by the epoch:
   a newer leader's progress refuses this one's, which closes the gate).

A crash between 3 and 4 makes the next pass (or the next leader) produce the same
uuids again: duplicates, harmless. A definition replaced between 1 and 3 is the
api's to void (``app.store.schedules``): its occurrences are tombstoned, so the
accept in 3 changes nothing; 4 then names it stale and the next pass reloads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from app import metrics
from app.backoff import RETRIED, Backoff, describe
from app.log import get_logger
from app.model import NewMessage
from app.recurrence import occurrence_uuid, plan
from app.store.schedules import HORIZON_MS, RETIRED_GRACE_MS, Schedules, Stored
from election.gate import LeadershipGate
from election.wakeable import WakeableLoop

log = get_logger("schedules")

PRODUCE_CHUNK = 500  # messages per accept call: bounds how long one call holds Redis


@dataclass
class MaterialiserStats:
    passes: int = 0
    produced: int = 0  # occurrences accepted (new or duplicate)
    created: int = 0  # of those, new messages
    skipped: int = 0  # missed occurrences the catch-up rule dropped
    voided: int = 0  # retired definitions this leader voided (an api died part way)
    refused: int = 0
    errors: int = 0


class Materialiser(WakeableLoop):
    """
    :param schedules: the definitions and the producing of their occurrences.
    :param gate: open with an epoch while this process leads.
    :param catchup: ``latest``, ``all`` or ``none`` (EAT_SCHEDULE_CATCHUP).
    :param interval: seconds between two passes; far below HORIZON_MS, so an occurrence
        is a delayed message long before it is due.
    """

    def __init__(
        self,
        schedules: Schedules,
        gate: LeadershipGate,
        catchup: str = "latest",
        interval: float = 1.0,
    ) -> None:
        super().__init__()
        self.schedules = schedules
        self.gate = gate
        self.catchup = catchup
        self.interval = interval
        self.stats = MaterialiserStats()
        self._loaded: dict[str, Stored] | None = None
        self._version = -1
        # name -> (generation, the next occurrence after its progress): a schedule is
        # planned only once that falls within the horizon.
        self._next: dict[str, tuple[int, float]] = {}
        gate.on_change(self._leadership_changed)

    def _leadership_changed(self) -> None:
        # Another leader may have moved every schedule's progress meanwhile: read it anew.
        self._loaded = None
        self.poke()

    async def run(self) -> None:
        """Until stopped. Redis errors are retried with a backoff; any other exception ends
        the task, and with it the process (it is supervised)."""
        backoff = Backoff(0.05, 1.0)
        while not self.stopping:
            self.rearm()
            epoch = self.gate.epoch
            if epoch is None:
                await self.pause(None)
                continue
            try:
                await self.materialise(epoch)
            except RETRIED as exc:
                self.stats.errors += 1
                self._loaded = None
                delay = backoff.next()
                log.warning("schedule pass failed", error=describe(exc), retry_in=delay)
                await self.pause(delay)
                continue
            backoff.reset()
            await self.pause(self.interval)

    async def materialise(self, epoch: int) -> None:
        """One pass under ``epoch`` (see the module docstring)."""
        s = self.schedules
        now, version, retired = await s.clock()
        if self._loaded is None or version != self._version:
            self._loaded = await s.load_all()
            self._version = version
            self._next.clear()
        self.stats.passes += 1
        if retired:
            await self._void_abandoned(now)
        until = now + HORIZON_MS
        msgs: list[NewMessage] = []
        rows: list[tuple[str, int, int]] = []
        moved: dict[str, Stored] = {}
        for name, stored in self._loaded.items():
            d = stored.definition
            if d.paused:
                continue
            known = self._next.get(name)
            if known is not None and known[0] == stored.generation and known[1] > until:
                continue
            p = plan(d, stored.created_ms, stored.progress_ms, now, HORIZON_MS, self.catchup)
            if p.through != stored.progress_ms:
                rows.append((name, stored.generation, p.through))
                moved[name] = replace(stored, progress_ms=p.through)
            self.stats.skipped += p.skipped
            if p.skipped:
                metrics.SCHEDULE_SKIPPED.inc(p.skipped)
                log.info("missed occurrences skipped", schedule=name, skipped=p.skipped)
            msgs.extend(
                NewMessage(
                    uuid=occurrence_uuid(name, stored.generation, at), message=d.message, run_at=at
                )
                for at in p.produce
            )
            self._next[name] = (stored.generation, p.next_ms)
        for i in range(0, len(msgs), PRODUCE_CHUNK):
            accepted = await s.produce(msgs[i : i + PRODUCE_CHUNK])
            created = sum(1 for a in accepted if a.created)
            self.stats.produced += len(accepted)
            self.stats.created += created
            metrics.SCHEDULE_OCCURRENCES.inc(created)
        if not rows:
            return
        refused_by, stale = await s.record_progress(epoch, rows)
        if refused_by is not None:
            self.stats.refused += 1
            log.warning(
                "schedule progress refused: a newer leader exists",
                epoch=epoch,
                stored_epoch=refused_by,
            )
            self.gate.mark_stale(epoch)
            return
        self._loaded.update(moved)
        if stale:
            self._loaded = None  # replaced or deleted since the load: read them anew
        if msgs:
            log.debug("occurrences materialised", count=len(msgs), schedules=len(rows))

    async def _void_abandoned(self, now: int) -> None:
        for retired in await self.schedules.retired():
            if retired.at_ms < now - RETIRED_GRACE_MS:
                await self.schedules.void_retired(retired.generation)
                self.stats.voided += 1
                log.info(
                    "voided a replaced schedule's occurrences",
                    schedule=retired.name,
                    generation=retired.generation,
                )
