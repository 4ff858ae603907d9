"""B1: HTTP ingest of single messages, one api process, wrk with 64 connections.

Baseline in the same run: a bare Starlette endpoint (bench/bare_app.py) that
parses the body and answers 201 without Redis, served the same way. The api is
measured twice: with today's answers, and with ``EAT_LEGACY_HTTP=true`` (the
original service's answer shape), which must cost nothing more.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from app.ops.child import ChildProcess
from app.ops.servers import free_port
from bench.common import print_table, stack, write_result

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk_post.lua"


def wrk(url: str, seconds: int, connections: int) -> dict:
    if shutil.which("wrk") is None:
        raise SystemExit("B1 needs wrk: apt-get install wrk")
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(WRK_SCRIPT), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    summary["rate"] = summary["requests"] / (summary["duration_us"] / 1e6)
    return summary


def run(seconds: int = 10, connections: int = 64) -> dict:
    results = {}
    with stack(zookeeper=False) as s:
        port = free_port()
        env = dict(s.env)
        bare = ChildProcess(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.bare_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            cwd=HERE.parent,
            env=env,
        )
        s.processes.append(("bare", bare))
        _wait_port(port)
        results["bare Starlette (baseline)"] = wrk(f"http://127.0.0.1:{port}", seconds, connections)
        s.stop_processes(["bare"])
        url = s.api()
        results["echo-at-time api"] = wrk(url, seconds, connections)
        s.stop_processes(["api"])
        url = s.api("api-legacy-http", env={"EAT_LEGACY_HTTP": "true"})
        results["api, EAT_LEGACY_HTTP=true"] = wrk(url, seconds, connections)
    base = results["bare Starlette (baseline)"]["rate"]
    rows = [
        (
            name,
            r["rate"],
            r["rate"] / base * 100,
            r["p50_us"] / 1000,
            r["p99_us"] / 1000,
            r["non2xx"] + r["socket_errors"],
        )
        for name, r in results.items()
    ]
    print_table(
        f"B1 HTTP ingest, {connections} connections, {seconds} s "
        "(target: >= 8,000/s and >= 70 % of baseline)",
        ("endpoint", "msgs/s", "% of baseline", "p50 ms", "p99 ms", "errors"),
        rows,
    )
    payload = {"results": results, "ratio": results["echo-at-time api"]["rate"] / base}
    write_result("b1", payload)
    return payload


def _wait_port(port: int) -> None:
    import socket
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("baseline server did not start")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(HERE.parent))
    run()
