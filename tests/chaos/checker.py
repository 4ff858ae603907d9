"""What a scenario did to the messages: computed from the echo lines and the logs.

Inputs are facts recorded outside the service: what the load generator was told
(:class:`~tests.chaos.load.Post`), what each worker process wrote on stdout,
what each scheduler logged, and when the test injected each fault
(:class:`Timeline`). Figures per scenario:

* **lost**: answered 2xx, never echoed. A scenario that makes Redis itself lose data
  (the stream deleted, Redis restarted empty) says which messages that took, with the
  reason: those are **accounted for**, not lost; any other is lost.
* **duplicated**: echoed more than once. Each duplicate is *explained* when one
  of its echoes came from a worker process that was then killed or paused, and
  was written before that fault: the one way the design allows a second run (a
  worker died or stalled between handling and acknowledging). On a Redis Cluster,
  a master killed before its replica had its last writes loses the acknowledgements
  and promotions among them, which are undone, not lost (docs/cluster.md): a
  duplicate of a message of one of its partitions is explained too when one echo
  came before that kill and the others after it. Anything else is *unexplained*,
  a bug.
* **early**: an echo whose ``handledAt`` is before its ``runAt``.
* **order inversions**: within one worker process's echo order, two messages
  of one equal-``runAt`` group (posted one after the other by one thread, so
  accepted in that order) handled in the opposite order.
* **lateness**: ``handledAt - runAt`` of each message's first echo, p50/p99/max.
* **time without a leader**: from the schedulers' "leadership acquired/resumed"
  and "leadership lost/suspended/released" lines, and the times the test killed
  or paused a scheduler (a frozen leader leads nothing, whatever it last logged).
* **stale-epoch promotions refused**: "promotion refused: a newer leader exists"
  lines of every scheduler.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.chaos.load import Post
from tests.e2e.harness import LEADING_EVENTS, NOT_LEADING_PREFIXES, Cluster, ServiceProcess

# An echo written in the instant the signal was on its way still counts as before the fault.
FAULT_TOLERANCE_MS = 5


@dataclass(frozen=True)
class Fault:
    at: float  # epoch seconds, taken right after the fault was injected
    kind: str  # "kill", "pause", "resume", "term", "start", "redis-down", ...
    target: str  # a process name, "redis", "zk2"...
    process: ServiceProcess | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


class Timeline:
    """Every fault a test injected, in order."""

    def __init__(self) -> None:
        self.events: list[Fault] = []

    def record(
        self,
        kind: str,
        target: str,
        process: ServiceProcess | None = None,
        at: float | None = None,
        **detail: Any,
    ) -> Fault:
        fault = Fault(time.time() if at is None else at, kind, target, process, detail)
        self.events.append(fault)
        return fault

    def of(self, *kinds: str) -> list[Fault]:
        return [e for e in self.events if e.kind in kinds]

    def describe(self, since: float) -> str:
        return ", ".join(f"{e.kind} {e.target} @{e.at - since:.1f}s" for e in self.events)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Echo:
    uuid: str
    run_at: int
    handled_at: int
    attempt: int
    process: ServiceProcess
    index: int  # position in that process's output


@dataclass
class Report:
    posted: int
    accepted: int
    echoed: int
    lost: list[str]
    duplicated: dict[str, list[Echo]]
    unexplained_duplicates: dict[str, list[Echo]]
    early: list[Echo]
    inversions: int
    inversion_examples: list[str]
    lateness_ms: list[int]
    lateness_delayed_ms: list[int]
    unknown_echoes: list[str]
    no_leader_s: float
    longest_gap_s: float
    leader_changes: int
    refused: int
    # Accepted, never echoed, and known to have gone with data Redis lost: uuid -> reason.
    accounted: dict[str, str] = field(default_factory=dict)

    @property
    def p50(self) -> float:
        return percentile(self.lateness_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.lateness_ms, 99)

    @property
    def max_lateness(self) -> float:
        return max(self.lateness_ms) if self.lateness_ms else math.nan

    @property
    def max_delayed_lateness(self) -> float:
        return max(self.lateness_delayed_ms) if self.lateness_delayed_ms else math.nan

    def summary(self) -> str:
        return (
            f"posted {self.posted}, accepted {self.accepted}, lost {len(self.lost)}, "
            f"duplicated {len(self.duplicated)} (unexplained {len(self.unexplained_duplicates)}), "
            f"early {len(self.early)}, inversions {self.inversions}, lateness p50 {self.p50} "
            f"p99 {self.p99} max {self.max_lateness} ms, without leader {self.no_leader_s:.2f} s "
            f"(longest {self.longest_gap_s:.2f} s, {self.leader_changes} acquisitions), "
            f"refused {self.refused}"
            + (
                f", accounted for (lost with Redis' data) {self.accounted_by_reason()}"
                if self.accounted
                else ""
            )
        )

    def accounted_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for reason in self.accounted.values():
            counts[reason] += 1
        return dict(counts)


def echoes_of(cluster: Cluster, event: str = "echo") -> list[Echo]:
    found: list[Echo] = []
    for proc in cluster.history:
        if proc.role != "worker":
            continue
        for i, line in enumerate(x for x in proc.stdout_lines() if x.get("event") == event):
            found.append(
                Echo(
                    uuid=str(line["uuid"]),
                    run_at=int(line["runAt"]),
                    handled_at=int(line["handledAt"]),
                    attempt=int(line.get("attempt", 1)),
                    process=proc,
                    index=i,
                )
            )
    return found


def _explains(fault_times: Mapping[ServiceProcess, list[float]], echoes: list[Echo]) -> bool:
    """A duplicate is explained when one echo came from a worker that was killed or
    paused right after writing it (so it may not have acknowledged it), and every other
    echo came after that fault (another worker reclaimed the entry meanwhile)."""
    for echo in echoes:
        for at in fault_times.get(echo.process, []):
            fault_ms = at * 1000 + FAULT_TOLERANCE_MS
            others = [e for e in echoes if e is not echo]
            if echo.handled_at <= fault_ms and all(e.handled_at >= fault_ms for e in others):
                return True
    return False


def master_kills(timeline: Timeline) -> list[tuple[float, frozenset[int]]]:
    """(when, the partitions it served) of every Redis Cluster master killed."""
    return [
        (fault.at, frozenset(fault.detail["partitions"]))
        for fault in timeline.of("kill")
        if "partitions" in fault.detail
    ]


def _explained_by_failover(
    kills: list[tuple[float, frozenset[int]]], partition: int | None, echoes: list[Echo]
) -> bool:
    """A duplicate of a message whose master was killed: one echo before the kill (its
    acknowledgement, or its promotion, went with the writes the replica never had), the
    others after it (the promoted replica delivered it again)."""
    for at, partitions in kills:
        if partition not in partitions:
            continue
        fault_ms = at * 1000 + FAULT_TOLERANCE_MS
        before = [e for e in echoes if e.handled_at <= fault_ms]
        if len(before) == 1 and all(e.handled_at >= fault_ms for e in echoes if e is not before[0]):
            return True
    return False


def leader_gaps(
    cluster: Cluster, timeline: Timeline, start: float, end: float
) -> tuple[float, float, int]:
    """(seconds without a leader, longest such gap, acquisitions) in [start, end]."""
    intervals: list[tuple[float, float]] = []
    acquisitions = 0
    stops: dict[ServiceProcess, list[float]] = defaultdict(list)
    for fault in timeline.of("kill", "pause"):
        if fault.process is not None:
            stops[fault.process].append(fault.at)
    for proc in cluster.history:
        if proc.role != "scheduler":
            continue
        marks: list[tuple[float, bool]] = []
        for line in proc.log_lines():
            event = str(line.get("event", ""))
            if event in LEADING_EVENTS or event.startswith(NOT_LEADING_PREFIXES):
                at = proc.log_time(line)
                if at is not None:
                    marks.append((at, event in LEADING_EVENTS))
                    acquisitions += event == "leadership acquired"
        marks += [(at, False) for at in stops[proc]]
        marks.sort()
        since: float | None = None
        for at, leading in marks:
            if leading and since is None:
                since = at
            elif not leading and since is not None:
                intervals.append((since, at))
                since = None
        if since is not None:
            intervals.append((since, end))
    # Uncovered time inside [start, end].
    covered = sorted((max(a, start), min(b, end)) for a, b in intervals if b > start and a < end)
    gaps: list[float] = []
    cursor = start
    for a, b in covered:
        if a > cursor:
            gaps.append(a - cursor)
        cursor = max(cursor, b)
    if cursor < end:
        gaps.append(end - cursor)
    return sum(gaps), max(gaps, default=0.0), acquisitions


def refusals(cluster: Cluster) -> int:
    return sum(
        1
        for proc in cluster.history
        if proc.role == "scheduler"
        for line in proc.log_lines()
        if line.get("event") == "promotion refused: a newer leader exists"
    )


def analyze(
    cluster: Cluster,
    posts: Iterable[Post],
    timeline: Timeline,
    *,
    start: float,
    end: float,
    exclude: set[str] | None = None,
    accounted: Mapping[str, str] | None = None,
    partition_of: Callable[[str], int] | None = None,
) -> Report:
    """Figures for the messages in ``posts`` (minus ``exclude``, e.g. poison messages).

    ``partition_of`` (uuid -> partition) on a Redis Cluster, to explain the duplicates a
    killed master causes.

    ``accounted`` maps the uuids a scenario knows went with data Redis lost to the reason
    (the first that applies): those of them never echoed are reported as accounted for,
    not as lost.
    """
    exclude = exclude or set()
    accounted = accounted or {}
    posts = [p for p in posts if p.uuid not in exclude]
    by_uuid = {p.uuid: p for p in posts}
    accepted = {p.uuid for p in posts if p.accepted}
    echoes = [e for e in echoes_of(cluster) if e.uuid not in exclude]
    per_uuid: dict[str, list[Echo]] = defaultdict(list)
    for echo in echoes:
        per_uuid[echo.uuid].append(echo)

    fault_times: dict[ServiceProcess, list[float]] = defaultdict(list)
    for fault in timeline.of("kill", "pause"):
        if fault.process is not None and fault.process.role == "worker":
            fault_times[fault.process].append(fault.at)
    duplicated = {u: es for u, es in per_uuid.items() if len(es) > 1}
    kills = master_kills(timeline)
    unexplained = {
        u: es
        for u, es in duplicated.items()
        if not _explains(fault_times, es)
        and not (partition_of is not None and _explained_by_failover(kills, partition_of(u), es))
    }

    lateness: list[int] = []
    lateness_delayed: list[int] = []
    for uuid in accepted & per_uuid.keys():
        first = min(per_uuid[uuid], key=lambda e: e.handled_at)
        lateness.append(first.handled_at - first.run_at)
        if by_uuid[uuid].state == "scheduled":
            lateness_delayed.append(first.handled_at - first.run_at)

    inversions = 0
    examples: list[str] = []
    # On a cluster a killed master undoes promotions and acknowledgements, and the
    # messages run again in their order, after later ones: a second run is a duplicate
    # (explained or not, above), not an inversion. Only first runs are compared there.
    first_runs = {id(min(es, key=lambda e: e.handled_at)) for es in per_uuid.values()}
    for proc in cluster.history:
        if proc.role != "worker":
            continue
        # group -> seqs in echo order; with partitions, a group's members in one partition
        # (order holds within a partition only: docs/cluster.md).
        seen_in_group: dict[tuple[int, int], list[int]] = defaultdict(list)
        for echo in sorted((e for e in echoes if e.process is proc), key=lambda e: e.index):
            post = by_uuid.get(echo.uuid)
            if post is None or post.group is None:
                continue
            if partition_of is not None and id(echo) not in first_runs:
                continue
            part = partition_of(post.uuid) if partition_of is not None else 0
            earlier = seen_in_group[(post.group, part)]
            later_accepted = [s for s in earlier if s > post.seq]
            if later_accepted:
                inversions += len(later_accepted)
                if len(examples) < 5:
                    examples.append(
                        f"{proc.name}: group {post.group} seq {post.seq} after {later_accepted}"
                    )
            earlier.append(post.seq)

    no_leader, longest, acquisitions = leader_gaps(cluster, timeline, start, end)
    never_echoed = accepted - per_uuid.keys()
    return Report(
        posted=len(posts),
        accepted=len(accepted),
        echoed=len(per_uuid),
        lost=sorted(never_echoed - accounted.keys()),
        duplicated=duplicated,
        unexplained_duplicates=unexplained,
        early=[e for e in echoes if e.handled_at < e.run_at],
        inversions=inversions,
        inversion_examples=examples,
        lateness_ms=lateness,
        lateness_delayed_ms=lateness_delayed,
        unknown_echoes=sorted(per_uuid.keys() - by_uuid.keys()),
        no_leader_s=no_leader,
        longest_gap_s=longest,
        leader_changes=acquisitions,
        refused=refusals(cluster),
        accounted={u: accounted[u] for u in sorted(never_echoed & accounted.keys())},
    )


# -- the table ------------------------------------------------------------------------------

COLUMNS: list[tuple[str, int]] = [
    ("scenario", 44),
    ("posted", 6),
    ("2xx", 5),
    ("lost", 4),
    ("dup", 3),
    ("early", 5),
    ("inv", 3),
    ("p50 ms", 6),
    ("p99 ms", 6),
    ("max ms", 6),
    ("no leader s", 11),
    ("refused", 7),
    ("wall s", 6),
]


def _cell(value: object, width: int) -> str:
    if isinstance(value, float):
        text = "-" if math.isnan(value) else f"{value:.0f}" if width <= 6 else f"{value:.2f}"
    else:
        text = str(value)
    return text.rjust(width) if not isinstance(value, str) else text.ljust(width)


def table_header() -> str:
    return " | ".join(
        name.ljust(w) if i == 0 else name.rjust(w) for i, (name, w) in enumerate(COLUMNS)
    )


def table_rule() -> str:
    return "-+-".join("-" * w for _, w in COLUMNS)


def table_row(scenario: str, report: Report, wall: float) -> str:
    values: list[object] = [
        scenario[: COLUMNS[0][1]],
        report.posted,
        report.accepted,
        len(report.lost),
        len(report.duplicated),
        len(report.early),
        report.inversions,
        report.p50,
        report.p99,
        report.max_lateness,
        f"{report.no_leader_s:.2f}".rjust(COLUMNS[10][1]),
        report.refused,
        f"{wall:.1f}".rjust(COLUMNS[12][1]),
    ]
    return " | ".join(_cell(v, w) for v, (_, w) in zip(values, COLUMNS, strict=True))
