"""Security defaults with real processes: no secret in any output, ZooKeeper ACLs,
health ports on the scheduler and worker."""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from kazoo.client import KazooClient

from tests.e2e.harness import Cluster, ServiceProcess, now_ms
from tests.servers import RedisServer, free_port
from tests.wait import wait_until

pytestmark = pytest.mark.e2e

REDIS_PASSWORD = "redis-pass-" + uuidlib.uuid4().hex
API_TOKEN = "api-token-" + uuidlib.uuid4().hex
ZK_PASSWORD = "zk-pass-" + uuidlib.uuid4().hex
SECRETS = (REDIS_PASSWORD, API_TOKEN, ZK_PASSWORD)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", extra_args=["--requirepass", REDIS_PASSWORD])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_no_secret_reaches_any_log_or_response_and_election_nodes_carry_the_acl(
    private_redis: RedisServer, zk_hosts: str, prefix: str, tmp_path: Path
) -> None:
    redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{private_redis.port}/0"
    env = {"EAT_API_TOKEN": API_TOKEN, "EAT_ZK_AUTH": f"svc:{ZK_PASSWORD}"}
    with Cluster(redis_url, zk_hosts, prefix, tmp_path / "cluster", env=env) as cluster:
        cluster.start(apis=1, schedulers=0, workers=0)
        ports = {"scheduler": free_port(), "worker": free_port()}
        extra = []
        for role, port in ports.items():
            proc_env = dict(cluster.env, EAT_HEALTH_PORT=str(port))
            argv = [cluster.script, role] + (
                ["--consumer-name", f"{prefix}-w"] if role == "worker" else []
            )
            extra.append(ServiceProcess(role, argv, proc_env, cluster.workdir, name=f"{role}-h"))
        cluster.launch(extra)
        cluster.wait_for_leader(15)
        api = cluster.apis[0].base_url
        auth = {"Authorization": f"Bearer {API_TOKEN}"}
        with httpx.Client(base_url=api, timeout=5) as http:
            replies = [
                http.post("/api/v1/save-message", json={"message": "x", "runAt": 1}),
                http.post(
                    "/api/v1/save-message",
                    json={"message": "x", "runAt": 1},
                    headers={"Authorization": "Bearer wrong"},
                ),
                http.post("/api/v1/save-message", json={"message": 1, "runAt": 1}, headers=auth),
                http.post(
                    "/api/v1/save-message",
                    content=b"{",
                    headers={**auth, "Content-Type": "application/json"},
                ),
            ]
            uid = str(uuidlib.uuid4())
            ok = http.post(
                "/api/v1/save-message",
                json={"message": "hello", "runAt": now_ms() + 300, "uuid": uid},
                headers=auth,
            )
            assert ok.status_code == 201
            replies += [
                ok,
                http.get("/metrics"),
                http.get("/readyz"),
                http.get("/api/v1/stats", headers=auth),
                http.get(f"/api/v1/messages/{uid}", headers=auth),
                http.get("/api/v1/dead", headers=auth),
                http.get("/api/v1/stats"),
            ]
            wait_until(
                lambda: any(e["uuid"] == uid for e in cluster.all_echoes()),
                "the message to be echoed through the authenticated stack",
                10,
            )
            # Redis down: the 503 path and the workers' and scheduler's error paths log too.
            private_redis.kill()
            replies.append(
                http.post("/api/v1/save-message", json={"message": "y", "runAt": 1}, headers=auth)
            )
            assert replies[-1].status_code == 503
            private_redis.restart()
        assert [r.status_code for r in replies[:4]] == [401, 401, 422, 400]

        for role, port in ports.items():
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as health:
                assert health.get("/healthz").status_code == 200
                wait_until(
                    lambda h=health: h.get("/readyz").status_code == 200,
                    f"{role} to be ready again after Redis restarted",
                    10,
                )
                scrape = health.get("/metrics").text
                if role == "scheduler":
                    assert "eat_leader 1.0" in scrape
                    replies.append(health.get("/readyz"))

        zk = KazooClient(hosts=zk_hosts, auth_data=[("digest", f"svc:{ZK_PASSWORD}")])
        zk.start(timeout=10)
        try:
            election = f"/{prefix}/election"
            for child in zk.get_children(election):
                acls, _ = zk.get_acls(f"{election}/{child}")
                assert [acl.id.scheme for acl in acls] == ["digest"]
                assert all(acl.id.id.startswith("svc:") for acl in acls)
        finally:
            zk.stop()
            zk.close()

        cluster.stop()
        outputs = [p.stdout_path.read_text() + p.stderr_path.read_text() for p in cluster.history]
    texts = outputs + [r.text for r in replies] + [str(dict(r.headers)) for r in replies]
    for secret in SECRETS:
        assert not any(secret in text for text in texts), "a secret leaked"
