"""``echo-at-time up``: the whole service on one machine, for trying it and for development.

Starts its own Redis (AOF on) and ZooKeeper as child processes when
``EAT_REDIS_URL`` / ``EAT_ZK_HOSTS`` are not set, keeping their data under
``--data-dir`` so a restart keeps every message; then the API, the schedulers
and the workers as child processes, restarted if they die. Ctrl-C (or SIGTERM)
stops the processes first, gracefully, then the servers.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from app.log import get_logger
from app.ops.servers import (
    MissingBinaryError,
    RedisServer,
    ServerStartError,
    ZooKeeperServer,
)

log = get_logger("stack")

GRACE_SECONDS = 20.0


def _port_if_free(port: int) -> int | None:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return None
    return port


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)

    def start(self, env: dict[str, str]) -> None:
        # Own session: Ctrl-C reaches only `up`, which stops children in order.
        self.process = subprocess.Popen(self.argv, env=env, start_new_session=True)
        self.started_at = time.monotonic()
        log.info("started", child=self.name, pid=self.process.pid)


def child_commands(args: argparse.Namespace) -> list[Child]:
    base = [sys.executable, "-m", "app"]
    children = [Child("api", [*base, "api", "--host", args.host, "--port", str(args.port)])]
    children += [
        Child(f"scheduler-{i}", [*base, "scheduler"]) for i in range(1, args.schedulers + 1)
    ]
    children += [
        Child(
            f"worker-{i}",
            [*base, "worker", "--consumer-name", f"{socket.gethostname()}-worker-{i}"],
        )
        for i in range(1, args.workers + 1)
    ]
    return children


def run_stack(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).resolve()
    env = dict(os.environ)
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    with ExitStack() as servers:
        try:
            if not env.get("EAT_REDIS_URL"):
                redis = RedisServer(data_dir / "redis", port=_port_if_free(6379))
                servers.callback(redis.stop)
                redis.start()
                env["EAT_REDIS_URL"] = redis.url
                log.info("redis started", url=redis.url, data_dir=str(data_dir / "redis"))
            if not env.get("EAT_ZK_HOSTS"):
                zookeeper = ZooKeeperServer(data_dir / "zookeeper", port=_port_if_free(2181))
                servers.callback(zookeeper.stop)
                zookeeper.start()
                env["EAT_ZK_HOSTS"] = zookeeper.hosts
                log.info("zookeeper started", hosts=zookeeper.hosts)
        except MissingBinaryError as exc:
            print(f"echo-at-time up: {exc}", file=sys.stderr)
            return 2
        except ServerStartError as exc:
            print(f"echo-at-time up: {exc}", file=sys.stderr)
            return 1

        children = child_commands(args)
        for child in children:
            child.start(env)
        log.info(
            "stack ready",
            api=f"http://{args.host}:{args.port}/api/v1/save-message",
            redis=env["EAT_REDIS_URL"].split("@")[-1],
            zookeeper=env["EAT_ZK_HOSTS"],
        )
        try:
            _supervise(children, env, stop)
        finally:
            _stop_children(children)
    log.info("stack stopped")
    return 0


def _supervise(children: list[Child], env: dict[str, str], stop: threading.Event) -> None:
    """Restart a child that died, with a growing pause if it keeps dying at start."""
    while not stop.wait(0.2):
        for child in children:
            code = child.process.poll() if child.process else None
            if code is None:
                continue
            quick_death = time.monotonic() - child.started_at < 5.0
            child.restarts = child.restarts + 1 if quick_death else 1
            pause = min(0.5 * 2 ** (child.restarts - 1), 10.0)
            log.warning("child exited, restarting", child=child.name, code=code, in_s=pause)
            if stop.wait(pause):
                return
            child.start(env)


def _stop_children(children: list[Child]) -> None:
    running = [c.process for c in children if c.process and c.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
