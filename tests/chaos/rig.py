"""The chaos rig: servers, a cluster of service processes, proxies, and fault injectors.

:class:`ChaosEnv` owns one test's world: a Redis with AOF ``appendfsync always``
(its own, since tests kill and restart it), a 3-node ZooKeeper ensemble, and a
:class:`~tests.e2e.harness.Cluster` of 2 api, 3 scheduler and 3 worker processes.
Every scheduler reaches ZooKeeper through a :class:`~tests.chaos.proxy.ProxyGroup`
of its own (one proxy per ensemble node), so a test can cut exactly one
scheduler off (a partition) or hold its traffic past the session timeout (an
expired session). Any process can also be given a proxy to Redis.

:class:`Faults` injects each fault and records it, with the time, in the
test's :class:`~tests.chaos.checker.Timeline`: the checker needs to know when a
worker was killed or paused (to explain a duplicate) and when a leader stopped
leading (for the time without a leader).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from kazoo.client import KazooClient

from app.store.codec import member_uuid, uuid_text
from app.store.keys import CONSUMER_GROUP, Keyspace
from tests.chaos.checker import Report, Timeline, analyze
from tests.chaos.load import LoadGenerator
from tests.chaos.proxy import PausableProxy, ProxyGroup
from tests.e2e.harness import Cluster, ServiceProcess
from tests.servers import RedisServer, ZooKeeperEnsemble, ZooKeeperServer

REPO_ROOT = Path(__file__).resolve().parents[2]
SESSION_TIMEOUT = 2.0  # EAT_ZK_SESSION_TIMEOUT; the ensemble's tickTime is 500 ms


@dataclass(frozen=True)
class SchedulerSpec:
    """How to run one scheduler: e.g. under ``faketime`` with its clock offset."""

    command_prefix: Sequence[str] = ()
    clock_offset: float = 0.0
    env: Mapping[str, str] | None = None


class ChaosEnv:
    """One chaos test's servers, processes, proxies and fault timeline."""

    def __init__(
        self,
        redis_server: RedisServer,
        ensemble: ZooKeeperEnsemble,
        prefix: str,
        workdir: Path,
        timeline: Timeline,
    ) -> None:
        self.redis_server = redis_server
        self.ensemble = ensemble
        self.prefix = prefix
        self.keys = Keyspace(prefix)
        self.workdir = workdir
        self.timeline = timeline
        self.zk_proxies: dict[str, ProxyGroup] = {}  # scheduler slot -> its proxies
        self.redis_proxies: dict[str, PausableProxy] = {}  # process slot -> its proxy
        self.cluster: Cluster | None = None
        self.redis = redis.Redis.from_url(redis_server.url, socket_timeout=5.0)
        self.created = time.time()
        self.loads: list[LoadGenerator] = []

    @property
    def redis_url(self) -> str:
        """What the processes get as EAT_REDIS_URL (a cluster rig gives its seed node)."""
        return self.redis_server.url

    # -- building ---------------------------------------------------------------------

    def _redis_proxy(self, slot: str) -> dict[str, str]:
        proxy = PausableProxy("127.0.0.1", self.redis_server.port, f"redis-{slot}").start()
        self.redis_proxies[slot] = proxy
        return {"EAT_REDIS_URL": f"redis://{proxy.address}/0"}

    def start_cluster(
        self,
        *,
        apis: int = 2,
        schedulers: int | Sequence[SchedulerSpec] = 3,
        workers: int = 3,
        env: Mapping[str, str] | None = None,
        worker_handler: str | None = None,
        worker_concurrency: int | None = None,
        worker_command_prefix: Sequence[str] = (),
        redis_proxied: Sequence[str] = (),
        ordered_schedulers: bool = False,
        timeout: float = 60.0,
    ) -> Cluster:
        """Start the processes and wait until they are ready and one scheduler leads.

        :param worker_command_prefix: goes before each worker's console script (e.g. the
            in-process fault injector ``tests.chaos.inject``).
        :param redis_proxied: slots ("api-1", "worker-2"...) that reach Redis through a proxy.
        :param ordered_schedulers: start schedulers one after another, each joining the
            election before the next starts: scheduler-1 leads, scheduler-2 is next.
        """
        pythonpath = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        base_env = {"EAT_ZK_SESSION_TIMEOUT": f"{SESSION_TIMEOUT:g}", "PYTHONPATH": pythonpath}
        base_env.update(env or {})
        cluster = Cluster(
            self.redis_url,
            self.ensemble.hosts,
            self.prefix,
            self.workdir / "processes",
            session_timeout=SESSION_TIMEOUT,
            env=base_env,
        )
        self.cluster = cluster
        specs = (
            [SchedulerSpec() for _ in range(schedulers)]
            if isinstance(schedulers, int)
            else list(schedulers)
        )

        def extra(slot: str, more: Mapping[str, str] | None = None) -> dict[str, str]:
            out = dict(more or {})
            if slot in redis_proxied:
                out.update(self._redis_proxy(slot))
            return out

        api_procs = [cluster.add_api(env=extra(f"api-{i + 1}")) for i in range(apis)]
        scheduler_procs: list[ServiceProcess] = []
        for i, spec in enumerate(specs):
            slot = f"scheduler-{i + 1}"
            group = ProxyGroup(self.ensemble.hosts, f"zk-{slot}").start()
            self.zk_proxies[slot] = group
            scheduler_procs.append(
                cluster.add_scheduler(
                    env=extra(slot, {"EAT_ZK_HOSTS": group.hosts, **(spec.env or {})}),
                    command_prefix=spec.command_prefix,
                    clock_offset=spec.clock_offset,
                )
            )
        worker_procs = [
            cluster.add_worker(
                worker_concurrency,
                handler=worker_handler,
                env=extra(f"worker-{i + 1}", {"EAT_CHAOS_WORKER": f"worker-{i + 1}"}),
                command_prefix=worker_command_prefix,
            )
            for i in range(workers)
        ]
        if ordered_schedulers:
            cluster.launch([*api_procs, *worker_procs], timeout)
            for n, proc in enumerate(scheduler_procs, start=1):
                cluster.launch([proc], timeout)
                cluster.wait_until(
                    lambda n=n: len(self.election_nodes()) >= n,
                    f"{n} schedulers in the election",
                    timeout,
                )
        else:
            cluster.launch([*api_procs, *scheduler_procs, *worker_procs], timeout)
        if scheduler_procs:
            cluster.wait_for_leader(timeout)
        return cluster

    def election_nodes(self) -> list[str]:
        client = KazooClient(hosts=self.ensemble.hosts, timeout=5.0)
        client.start(timeout=10.0)
        try:
            return (
                client.get_children(self.keys.zk_election)
                if client.exists(self.keys.zk_election)
                else []
            )
        finally:
            client.stop()
            client.close()

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        for group in self.zk_proxies.values():
            group.close()
        for proxy in self.redis_proxies.values():
            proxy.close()
        for load in self.loads:
            load.stop()
        self.redis.close()

    # -- load and results ---------------------------------------------------------------

    def api_urls(self) -> list[str]:
        assert self.cluster is not None
        return [p.base_url for p in self.cluster.apis]

    def load(self, total: int, duration: float, **options: Any) -> LoadGenerator:
        load = LoadGenerator(self.api_urls, total, duration, **options)
        self.loads.append(load)
        return load

    def drained(self) -> bool:
        """Nothing scheduled, nothing in the stream, nothing pending."""
        try:
            if self.redis.zcard(self.keys.delayed) or self.redis.xlen(self.keys.stream):
                return False
            return self.redis.xpending(self.keys.stream, CONSUMER_GROUP)["pending"] == 0
        except redis.ResponseError:
            return True  # no group yet
        except redis.ConnectionError:
            return False

    def settle(
        self, load: LoadGenerator, exclude: set[str] | None = None, after_last_due: float = 25.0
    ) -> None:
        """Wait until the load has finished, every accepted message was echoed (but those
        in ``exclude``) and Redis holds no work: no further echo can then appear."""
        assert self.cluster is not None
        cluster = self.cluster
        cluster.wait_until(
            lambda: load.done, "load to finish", load.duration + load.give_up_after + 10
        )
        exclude = exclude or set()
        expected = {p.uuid for p in load.accepted()} - exclude
        last_due = max((p.run_at for p in load.snapshot()), default=0) / 1000

        def done() -> bool:
            echoed = {
                str(line["uuid"])
                for p in cluster.history
                if p.role == "worker"
                for line in p.echo_lines()
            }
            return expected <= echoed and self.drained()

        cluster.wait_until(
            done,
            f"{len(expected)} accepted messages echoed and Redis drained",
            max(0.0, last_due - time.time()) + after_last_due,
        )

    def analyze(
        self,
        load: LoadGenerator,
        start: float,
        exclude: set[str] | None = None,
        accounted: Mapping[str, str] | None = None,
    ) -> Report:
        assert self.cluster is not None
        return analyze(
            self.cluster,
            load.snapshot(),
            self.timeline,
            start=start,
            end=time.time(),
            exclude=exclude,
            accounted=accounted,
        )

    # -- Redis-side views ------------------------------------------------------------------

    def pending_of(self, consumer: str) -> list[tuple[str, str]]:
        """(entry id, uuid) of every entry pending for ``consumer``."""
        rows = self.redis.xpending_range(
            self.keys.stream,
            CONSUMER_GROUP,
            min="-",
            max="+",
            count=10_000,
            consumername=consumer,
        )
        out: list[tuple[str, str]] = []
        for row in rows:
            entry_id = row["message_id"]
            entries = self.redis.xrange(self.keys.stream, entry_id, entry_id)
            uuid = uuid_text(entries[0][1][b"u"]) if entries else ""
            out.append((entry_id.decode() if isinstance(entry_id, bytes) else entry_id, uuid))
        return out

    def stored_epoch(self) -> int | None:
        value = self.redis.get(self.keys.epoch)
        return None if value is None else int(value)


# Put before a console script: runs it with the bugs of tests/chaos/inject.py armed by files.
INJECT = (sys.executable, "-m", "tests.chaos.inject")


class Faults:
    """Fault injectors; each records what it did in the timeline."""

    def __init__(self, env: ChaosEnv) -> None:
        self.env = env
        self.timeline = env.timeline
        self._paused: set[ServiceProcess] = set()
        self._down_zk: list[ZooKeeperServer] = []

    @property
    def cluster(self) -> Cluster:
        assert self.env.cluster is not None
        return self.env.cluster

    # -- processes ------------------------------------------------------------------------

    def kill(self, proc: ServiceProcess, **detail: Any) -> None:
        """kill -9: a crash."""
        proc.kill()
        self.timeline.record("kill", proc.name, proc, **detail)

    def pause(self, proc: ServiceProcess, **detail: Any) -> None:
        """SIGSTOP: a GC pause, a frozen VM."""
        proc.pause()
        self._paused.add(proc)
        self.timeline.record("pause", proc.name, proc, **detail)

    def resume(self, proc: ServiceProcess) -> None:
        proc.resume()
        self._paused.discard(proc)
        self.timeline.record("resume", proc.name, proc)

    def terminate(self, proc: ServiceProcess) -> int:
        """SIGTERM and wait for a graceful exit; returns the exit code."""
        self.timeline.record("term", proc.name, proc)
        return proc.terminate()

    def bug(self, bugs: Path, name: str, procs: Sequence[ServiceProcess]) -> ServiceProcess:
        """Arm bug ``name`` of tests/chaos/inject.py (in ``bugs``, the processes'
        EAT_CHAOS_BUGS) and wait for one of ``procs`` to hit it and exit; it is recorded
        as a crash at the moment its exit was seen (after everything it wrote)."""
        (bugs / name).touch()
        crashed = self.cluster.wait_until(
            lambda: next((p for p in procs if p.returncode is not None), None),
            f"a process to hit the {name} bug and exit",
            SESSION_TIMEOUT + 10,
        )
        self.timeline.record("kill", crashed.name, crashed, cause=f"{name} bug")
        return crashed

    def restart(self, *procs: ServiceProcess) -> list[ServiceProcess]:
        fresh = self.cluster.restart(*procs)
        for proc in fresh:
            self.timeline.record("start", proc.name, proc)
        return fresh

    def pause_worker_holding_entries(
        self, proc: ServiceProcess, attempts: int = 200
    ) -> list[tuple[str, str]]:
        """Freeze a worker at a moment it holds unacknowledged entries (mid-batch).

        Pauses it, looks at its pending entries, and if it holds none lets it run
        a few ms and tries again. Those probe pauses last a few ms, far below the
        visibility timeout, and are not recorded as faults (so any duplicate they
        caused would count as unexplained). Returns the (entry id, uuid) pending.
        """
        consumer = self.cluster.consumer_name(proc)
        for _ in range(attempts):
            proc.pause()
            held = self.env.pending_of(consumer)
            if held:
                self._paused.add(proc)
                self.timeline.record("pause", proc.name, proc, pending=len(held))
                return held
            proc.resume()
            time.sleep(0.03)
        raise AssertionError(f"{proc.name} never held an unacknowledged entry")

    def resume_all(self) -> None:
        for proc in list(self._paused):
            self.resume(proc)

    # -- Redis ---------------------------------------------------------------------------

    def restart_redis(self, down_for: float) -> None:
        """kill -9 Redis, keep it down ``down_for`` s, start it again from its AOF."""
        self.env.redis_server.kill()
        self.timeline.record("kill", "redis")
        time.sleep(down_for)
        self.env.redis_server.restart()
        self.timeline.record("start", "redis")

    def delete_stream(self) -> set[str]:
        """DEL the stream (as an operator or an eviction would) under load; returns the
        uuids of the entries it held, read in the same MULTI, so exactly what went."""
        keys = self.env.keys
        with self.env.redis.pipeline(transaction=True) as pipe:
            pipe.xrange(keys.stream)
            pipe.delete(keys.stream)
            entries, _ = pipe.execute()
        self.timeline.record("stream-deleted", "redis", entries=len(entries))
        return {uuid_text(fields[b"u"]) for _id, fields in entries}

    def restart_redis_empty(self, down_for: float) -> set[str]:
        """kill -9 Redis and start it again without its data (its AOF files deleted), as a
        Redis without persistence restarts; returns the uuids of the messages it held (the
        sorted set and the stream), read while every write was paused just before the kill."""
        server, keys = self.env.redis_server, self.env.keys
        client = self.env.redis
        client.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
        members = client.zrange(keys.delayed, 0, -1)
        entries = client.xrange(keys.stream)
        server.kill()
        self.timeline.record("kill", "redis", data="lost")
        for path in server.data_dir.iterdir():
            if path.name == "appendonlydir":
                shutil.rmtree(path)
            elif path.suffix in (".aof", ".rdb"):
                path.unlink()
        time.sleep(down_for)
        server.restart()
        self.timeline.record("start", "redis", data="none")
        return {member_uuid(m) for m in members} | {uuid_text(f[b"u"]) for _i, f in entries}

    # -- ZooKeeper ------------------------------------------------------------------------

    def zk_leader_node(self) -> ZooKeeperServer:
        leader = self.env.ensemble.leader()
        assert leader is not None, "the ensemble has no leader"
        return leader

    def zk_node_of(self, proc: ServiceProcess) -> ZooKeeperServer | None:
        """The ensemble node a scheduler is connected to now (through its proxies)."""
        group = self.env.zk_proxies[proc.slot]
        for proxy, node in zip(group.proxies, self.env.ensemble.nodes, strict=True):
            if proxy.open_connections:
                return node
        return None

    def kill_zk(self, node: ZooKeeperServer) -> None:
        node.kill()
        self._down_zk.append(node)
        self.timeline.record("kill", f"zk{node.server_id}")

    def start_zk(self, node: ZooKeeperServer) -> None:
        node.restart()
        with contextlib.suppress(ValueError):
            self._down_zk.remove(node)
        self.timeline.record("start", f"zk{node.server_id}")

    def restore_zk(self) -> None:
        for node in list(self._down_zk):
            if not node.running:
                self.start_zk(node)

    # -- network ----------------------------------------------------------------------------

    def partition_from_zookeeper(self, proc: ServiceProcess) -> None:
        """Cut a scheduler off from every ZooKeeper node (its traffic is held)."""
        self.env.zk_proxies[proc.slot].pause()
        self.timeline.record("partition", proc.name, proc, server="zookeeper")

    def heal_zookeeper(self, proc: ServiceProcess) -> None:
        self.env.zk_proxies[proc.slot].resume()
        self.timeline.record("heal", proc.name, proc, server="zookeeper")

    def expire_session(self, proc: ServiceProcess, beyond: float = 1.0) -> None:
        """Expire a scheduler's ZooKeeper session: hold its ZooKeeper traffic for the
        session timeout plus ``beyond`` s (the ensemble expires the session), then heal."""
        self.partition_from_zookeeper(proc)
        time.sleep(SESSION_TIMEOUT + beyond)
        self.heal_zookeeper(proc)

    def partition_from_redis(
        self, proc: ServiceProcess, *, up: bool = True, down: bool = True
    ) -> None:
        """Hold a process's Redis traffic: ``up`` its requests, ``down`` the replies."""
        self.env.redis_proxies[proc.slot].pause(up=up, down=down)
        self.timeline.record("partition", proc.name, proc, server="redis", up=up, down=down)

    def heal_redis(self, proc: ServiceProcess) -> None:
        self.env.redis_proxies[proc.slot].resume()
        self.timeline.record("heal", proc.name, proc, server="redis")

    def heal_all(self) -> None:
        for group in self.env.zk_proxies.values():
            group.resume()
        for proxy in self.env.redis_proxies.values():
            proxy.resume()


@contextlib.contextmanager
def chaos_env(
    redis_server: RedisServer,
    ensemble: ZooKeeperEnsemble,
    prefix: str,
    workdir: Path,
    timeline: Timeline,
) -> Iterator[ChaosEnv]:
    env = ChaosEnv(redis_server, ensemble, prefix, workdir, timeline)
    try:
        yield env
    finally:
        env.close()
