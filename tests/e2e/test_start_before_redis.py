"""A scheduler and a worker started before their Redis: they keep trying, the worker's
/healthz answers meanwhile (so a liveness probe does not restart it), and both start
once Redis answers, then carry a message through."""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from pathlib import Path

import httpx
import pytest

from app.model import NewMessage
from app.settings import Settings
from app.store import Store, connect
from tests.e2e.harness import Cluster, ServiceProcess, now_ms
from tests.servers import RedisServer, free_port

pytestmark = pytest.mark.e2e


def health(port: int, path: str) -> tuple[int, dict] | None:
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=0.5)
    except httpx.HTTPError:
        return None
    return answer.status_code, answer.json()


def retried_connecting(proc: ServiceProcess) -> bool:
    return any(
        line.get("event") == "redis unavailable, retrying"
        and line.get("during") == "connecting to Redis"
        for line in proc.log_lines()
    )


async def accept_due_soon(settings: Settings, uuid: str) -> None:
    client = connect(settings)
    try:
        await Store(client, settings).accept(NewMessage(uuid, "late start", now_ms() + 300))
    finally:
        await client.aclose()


def test_a_scheduler_and_a_worker_started_before_redis_wait_for_it_then_work(
    zk_hosts: str, prefix: str, tmp_path: Path
) -> None:
    port, health_port = free_port(), free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = RedisServer(tmp_path / "redis", port=port)
    with Cluster(url, zk_hosts, prefix, tmp_path / "procs") as c:
        scheduler = c.add_scheduler()
        worker = c.add_worker(env={"EAT_HEALTH_PORT": str(health_port)})
        for proc in (scheduler, worker):
            c.history.append(proc)
            proc.start()
        for proc in (scheduler, worker):
            c.wait_until(lambda p=proc: retried_connecting(p), f"{proc.name} to retry", 15)
        # Alive, and saying why it is not ready.
        assert health(health_port, "/healthz") == (200, {"status": "ok"})
        assert health(health_port, "/readyz") == (
            503,
            {"status": "unavailable", "redis": False, "memory_policy": True},
        )
        assert scheduler.running and worker.running

        server.start()
        try:
            c.wait_until(worker.is_ready, "the worker to start", 15)
            c.wait_until(scheduler.is_ready, "the scheduler to start", 15)
            c.wait_for_leader(15)
            c.wait_until(lambda: (health(health_port, "/readyz") or (0,))[0] == 200, "ready", 15)
            uuid = str(uuidlib.uuid4())
            asyncio.run(accept_due_soon(Settings.from_env({}, redis_url=url, prefix=prefix), uuid))
            c.wait_until(lambda: uuid in {e["uuid"] for e in worker.echo_lines()}, "the echo", 15)
        finally:
            c.stop()
            server.stop()
