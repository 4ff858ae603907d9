"""What every benchmark needs: its own servers, service processes, figures, output.

Each benchmark starts its own Redis (AOF everysec, as in production) and
ZooKeeper on loopback ports, runs the service through the console script, and
stops everything it started, by pid, when done.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.ops.child import ChildProcess, stop_all
from app.ops.cluster import RedisCluster
from app.ops.servers import RedisServer, ZooKeeperServer, free_port
from bench.placement import balance, owners

RESULTS = Path(__file__).resolve().parent / "results"


def console_script() -> str:
    return str(Path(sys.executable).parent / "echo-at-time")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def redis_cpu(r) -> float:
    """Seconds of CPU the Redis server has used (``INFO cpu``), steadier than wall time."""
    info = r.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def lateness_figures(late: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of lateness values in ms, under the names every result uses."""
    return {
        "p50_ms": percentile(late, 50),
        "p99_ms": percentile(late, 99),
        "max_ms": max(late, default=float("nan")),
    }


def burst_figures(echoes: Sequence[dict], run_at: int, count: int) -> dict[str, float]:
    """A burst of ``count`` messages all due at ``run_at``: how fast and how late it ran."""
    late = [e["handledAt"] - run_at for e in echoes]
    last = max((e["handledAt"] for e in echoes), default=float("nan"))
    seconds = (last - run_at) / 1000
    return {
        "echoed": len(echoes),
        "lost": count - len({e["uuid"] for e in echoes}),
        "seconds": seconds,
        "rate": len(echoes) / seconds if seconds > 0 else float("nan"),
        **lateness_figures(late),
    }


@dataclass
class Stack:
    """Servers and service processes of one benchmark run."""

    workdir: Path
    redis: RedisServer
    zookeeper: ZooKeeperServer | None
    env: dict[str, str]
    processes: list[tuple[str, ChildProcess]] = field(default_factory=list)
    # Every master (the one Redis without a cluster); ``redis`` is the first, the seed.
    masters: list[RedisServer] = field(default_factory=list)
    cluster: RedisCluster | None = None
    # The master (index in ``masters``) serving each partition: as created, as used.
    created_owners: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)

    def spawn(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> ChildProcess:
        """Start ``echo-at-time <argv>``, its stdout in ``<name>.out``, stderr in ``<name>.err``."""
        proc = ChildProcess(
            [console_script(), *argv],
            env=env or self.env,
            stdout=self.workdir / f"{name}.out",
            stderr=self.workdir / f"{name}.err",
        )
        self.processes.append((name, proc))
        return proc

    def api(self, name: str = "api", env: dict[str, str] | None = None) -> str:
        """Start an api (``env`` added to the stack's) and wait until it answers."""
        port = free_port()
        self.spawn(
            name, ["api", "--host", "127.0.0.1", "--port", str(port)], {**self.env, **(env or {})}
        )
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz")
        return url

    def wait_for_log(self, prefix: str, event: str, every: bool, timeout: float = 60.0) -> None:
        """Wait until one (or every) process whose name starts with ``prefix`` logged ``event``."""
        names = [n for n, _ in self.processes if n.startswith(prefix)]
        needle = f'"event": "{event}"'.encode()
        deadline = time.monotonic() + timeout
        while True:
            seen = [needle in (self.workdir / f"{n}.err").read_bytes() for n in names]
            if (all(seen) if every else any(seen)) and names:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {event!r} from {prefix}* within {timeout} s")
            time.sleep(0.05)

    def serve(self, schedulers: int, workers: int) -> None:
        """Start schedulers and workers (named scheduler<i>, worker<i>) and wait until serving."""
        for i in range(schedulers):
            self.spawn(f"scheduler{i}", ["scheduler"])
        for i in range(workers):
            self.spawn(f"worker{i}", ["worker", "--consumer-name", f"w{i}"])
        self.wait_until_serving()

    def wait_until_serving(self) -> None:
        """A scheduler leads and every worker has started: nothing posted now waits on start-up."""
        self.wait_for_log("scheduler", "leadership acquired", every=False)
        self.wait_for_log("worker", "worker started", every=True)

    def echo_lines(self, prefix: str = "worker") -> list[dict]:
        lines = []
        for name, _ in self.processes:
            if name.startswith(prefix):
                data = (self.workdir / f"{name}.out").read_bytes()
                # Only whole lines: the last one may still be being written.
                for raw in data[: data.rfind(b"\n") + 1].splitlines():
                    if raw.startswith(b"{"):
                        lines.append(json.loads(raw))
        return lines

    def wait_for_echoes(self, done: Callable[[list[dict]], bool], timeout: float) -> list[dict]:
        """The workers' echo lines once ``done`` says they are complete, or at the timeout."""
        deadline = time.monotonic() + timeout
        lines = self.echo_lines()
        while not done(lines) and time.monotonic() < deadline:
            time.sleep(0.2)
            lines = self.echo_lines()
        return lines

    def stop_processes(self, names: Sequence[str] | None = None) -> None:
        chosen = [(n, p) for n, p in self.processes if names is None or n in names]
        stop_all([proc for _, proc in chosen], grace=30)
        self.processes = [(n, p) for n, p in self.processes if (n, p) not in chosen]


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout} s")
        time.sleep(0.05)


@contextlib.contextmanager
def stack(
    zookeeper: bool = True,
    prefix: str = "bench",
    *,
    cluster_partitions: int = 0,
    balanced: bool = True,
    **settings: str,
) -> Iterator[Stack]:
    """Servers for one run: one Redis, or with ``cluster_partitions`` a local 3-master
    Redis Cluster (AOF everysec on each) and the processes set to that many partitions,
    spread evenly over the masters unless ``balanced`` is false (``bench.placement``)."""
    with tempfile.TemporaryDirectory(prefix="eat-bench-") as tmp, contextlib.ExitStack() as up:
        workdir = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EAT_")}
        cluster = None
        created: list[int] = []
        if cluster_partitions:
            # Redis' default node timeout, not the chaos tests' 2 s: a master busy with
            # a big load call while other work takes the shared cores must not be
            # declared failed (with no replicas, the whole cluster would stop serving).
            cluster = RedisCluster(workdir / "redis-cluster", node_timeout_ms=15_000).start()
            up.callback(cluster.stop)
            created = owners(cluster, prefix, cluster_partitions)
            if balanced:
                created, _ = balance(cluster, prefix, cluster_partitions)
            masters: list[RedisServer] = list(cluster.nodes)
            env.update(EAT_REDIS_CLUSTER="true", EAT_PARTITIONS=str(cluster_partitions))
            # The legacy lists in one slot, as docs/cluster.md tells an operator to do.
            env.update(
                EAT_LEGACY_QUEUE="{legacy}Queue",
                EAT_LEGACY_DELAYED="{legacy}QueueDelayed",
                EAT_LEGACY_IN_FLIGHT="{legacy}QueueDead",
            )
        else:
            masters = [RedisServer(workdir / "redis").start()]  # AOF, appendfsync everysec
            up.callback(masters[0].stop)
        zk = ZooKeeperServer(workdir / "zk").start() if zookeeper else None
        if zk:
            up.callback(zk.stop)
        env.update(
            EAT_REDIS_URL=masters[0].url,
            EAT_ZK_HOSTS=zk.hosts if zk else "127.0.0.1:1",
            EAT_PREFIX=prefix,
            EAT_LOG_FORMAT="json",
            EAT_LOG_LEVEL="info",
            EAT_ZK_SESSION_TIMEOUT="2",
        )
        env.update({f"EAT_{k.upper()}": v for k, v in settings.items()})
        run = Stack(workdir, masters[0], zk, env, masters=masters, cluster=cluster)
        if cluster:
            run.created_owners = created
            run.owners = owners(cluster, prefix, cluster_partitions)
        else:
            run.created_owners = run.owners = [0]
        # Registered last, so it runs first: the processes stop before their servers.
        up.callback(run.stop_processes)
        yield run


def write_result(bench_id: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{bench_id}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print(
            "  "
            + "  ".join(
                c.rjust(w) if j else c.ljust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def redis_benchmark(port: int, count: int, *command: str, extra: Sequence[str] = ()) -> float:
    """requests/s of ``redis-benchmark -P 16`` running ``command`` against our Redis."""
    out = subprocess.run(
        [
            "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-n",
            str(count),
            "-P",
            "16",
            *extra,
            "-q",
            *command,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"([0-9.]+) requests per second", out.replace(",", ""))
    return float(match.group(1)) if match else float("nan")
