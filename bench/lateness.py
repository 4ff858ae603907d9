"""End-to-end lateness of delayed messages: POST -> sorted set -> leader -> stream -> echo.

Starts its own Redis (AOF everysec) and ZooKeeper on loopback, then one api, two
schedulers and two workers through the console script; posts messages due
``--delay`` seconds ahead at ``--rate`` per second for ``--seconds``; reads the
echo lines and prints lateness percentiles (handling time minus runAt). The
baseline printed beside it is the same pipeline's floor for a message posted
already due (HTTP -> stream -> echo), measured in the same run.

    python bench/lateness.py --rate 100 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from app.child_servers import RedisServer, ZooKeeperServer, free_port


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def start(role: list[str], env: dict[str, str], out: Path) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "echo-at-time"
    with open(out, "wb") as stdout, open(out.with_suffix(".err"), "wb") as stderr:
        return subprocess.Popen([str(exe), *role], env=env, stdout=stdout, stderr=stderr)


def post_paced(client: httpx.Client, url: str, rate: float, seconds: float, delay_ms: int) -> set:
    posted = set()
    interval = 1.0 / rate
    begin = time.monotonic()
    n = 0
    while time.monotonic() - begin < seconds:
        target = begin + n * interval
        pause = target - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        uid = str(uuid.uuid4())
        run_at = int(time.time() * 1000) + delay_ms
        reply = client.post(url, json={"message": "bench", "runAt": run_at, "uuid": uid})
        if reply.status_code == 201:
            posted.add(uid)
        n += 1
    return posted


def echoes(paths: list[Path]) -> list[dict]:
    lines = []
    for path in paths:
        for raw in path.read_bytes().splitlines():
            if raw.startswith(b"{"):
                lines.append(json.loads(raw))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to post")
    parser.add_argument("--delay", type=float, default=2.0, help="seconds from post to runAt")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="eat-bench-") as tmp:
        base = Path(tmp)
        redis = RedisServer(base / "redis").start()
        zk = ZooKeeperServer(base / "zk").start()
        port = free_port()
        env = dict(os.environ)
        env.update(
            EAT_REDIS_URL=redis.url,
            EAT_ZK_HOSTS=zk.hosts,
            EAT_PREFIX="bench",
            EAT_LOG_FORMAT="json",
            EAT_ZK_SESSION_TIMEOUT="2",
        )
        procs = [start(["api", "--port", str(port)], env, base / "api.out")]
        procs += [start(["scheduler"], env, base / f"scheduler{i}.out") for i in range(2)]
        worker_out = [base / f"worker{i}.out" for i in range(2)]
        procs += [start(["worker"], env, out) for out in worker_out]
        url = f"http://127.0.0.1:{port}/api/v1/save-message"
        try:
            with httpx.Client(timeout=5.0) as client:
                deadline = time.monotonic() + 20
                while True:
                    try:
                        if client.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise SystemExit("api did not become ready")
                    time.sleep(0.05)
                baseline = post_paced(client, url, args.rate, min(args.seconds, 3.0), -1)
                delayed = post_paced(client, url, args.rate, args.seconds, int(args.delay * 1000))
            wanted = baseline | delayed
            deadline = time.monotonic() + args.delay + 15
            while time.monotonic() < deadline:
                seen = {e["uuid"] for e in echoes(worker_out)}
                if wanted <= seen:
                    break
                time.sleep(0.1)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(20)
            zk.stop()
            redis.stop()

        lines = echoes(worker_out)
        counts: dict[str, int] = {}
        for e in lines:
            counts[e["uuid"]] = counts.get(e["uuid"], 0) + 1
        header = ("run", "n", "lost", "dup", "p50 ms", "p99 ms", "max ms")
        print("{:<28} {:>6} {:>5} {:>4} {:>7} {:>7} {:>7}".format(*header))
        for name, group in (("baseline: posted already due", baseline), ("delayed", delayed)):
            late = [e["handledAt"] - e["runAt"] for e in lines if e["uuid"] in group]
            if name.startswith("baseline"):
                # runAt was 1 ms in the past at posting: lateness here is post -> echo.
                late = [x - 1 for x in late]
            lost = len(group - counts.keys())
            dup = sum(1 for u in group if counts.get(u, 0) > 1)
            print(
                f"{name:<28} {len(group):>6} {lost:>5} {dup:>4} {percentile(late, 50):>7.0f} "
                f"{percentile(late, 99):>7.0f} {max(late, default=float('nan')):>7.0f}"
            )
        early = [e for e in lines if e["uuid"] in delayed and e["handledAt"] < e["runAt"]]
        print(f"early: {len(early)}  rate: {args.rate}/s  delay: {args.delay}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
