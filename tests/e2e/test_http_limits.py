"""The HTTP limits on the real api process (``echo-at-time api``), through raw sockets:
its memory under a huge header, its file descriptors under a flood of idle sockets,
and an ordinary client served meanwhile."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from contextlib import ExitStack

import httpx
import pytest

from tests.e2e.harness import Cluster, ServiceProcess, now_ms
from tests.wait import wait_until

pytestmark = pytest.mark.e2e

SLACK = 5.0  # seconds past a limit before a test gives up


def status_value(pid: int, field: str) -> int:
    """A ``VmHWM``-like figure of /proc/<pid>/status, in kB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def connect(api: ServiceProcess, stack: ExitStack) -> socket.socket:
    sock = stack.enter_context(socket.create_connection(("127.0.0.1", api.port), timeout=SLACK))
    return sock


def until_closed(sock: socket.socket, within: float) -> bytes:
    """What the server sends until it closes the connection; fails after ``within`` s."""
    sock.settimeout(within)
    data = b""
    deadline = time.monotonic() + within
    try:
        while chunk := sock.recv(65536):
            data += chunk
            if time.monotonic() > deadline:
                break
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the api did not close the connection within {within} s") from None
    return data


def test_a_50_mb_header_is_answered_431_without_the_api_growing(
    cluster: Callable[..., Cluster],
) -> None:
    c = cluster(schedulers=0, workers=0)
    api = c.apis[0]
    with ExitStack() as stack:
        # Warm up: the ordinary paths and one refusal, so what follows measures only the attack.
        with httpx.Client(base_url=api.base_url, timeout=SLACK) as http:
            assert http.get("/healthz").status_code == 200
            small = http.get("/healthz", headers={"X-Filler": "a" * 100_000})
            assert small.status_code == 431
        peak_before = status_value(api.pid, "VmHWM")
        sock = connect(api, stack)
        attack = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * (50 << 20) + b"\r\n\r\n"

        def send() -> None:
            with contextlib.suppress(OSError):  # the api stops reading: that is the point
                sock.sendall(attack)

        sender = threading.Thread(target=send)
        sender.start()
        answer = until_closed(sock, SLACK)
        sender.join(SLACK)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        grown_kb = status_value(api.pid, "VmHWM") - peak_before
        # It read the limit (64 KiB), a socket read or two and what it drops while it closes.
        assert grown_kb < 8 * 1024, f"the api's peak memory grew by {grown_kb} kB"
        with httpx.Client(base_url=api.base_url, timeout=SLACK) as http:
            assert http.get("/healthz").status_code == 200


def test_idle_and_slow_sockets_cannot_lock_ordinary_clients_out_of_the_api(
    cluster: Callable[..., Cluster],
) -> None:
    cap = 16
    env = {
        "EAT_HTTP_MAX_CONNECTIONS": str(cap),
        "EAT_HTTP_HEADER_TIMEOUT": "1",
        "EAT_HTTP_IDLE_TIMEOUT": "60",  # only the cap closes an idle socket here
    }
    c = cluster(schedulers=0, workers=0, env=env)
    api = c.apis[0]
    fds_before = open_fds(api.pid)
    with ExitStack() as stack:
        idle = [connect(api, stack) for _ in range(10 * cap)]
        # The api holds at most `cap` of them: the oldest were closed to make room.
        wait_until(
            lambda: open_fds(api.pid) <= fds_before + cap,
            f"the api to hold at most {cap} client sockets",
            SLACK,
        )
        assert until_closed(idle[0], SLACK) == b""
        slow = connect(api, stack)
        slow.sendall(b"POST /api/v1/save-message HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        uid = str(uuidlib.uuid4())
        with httpx.Client(base_url=api.base_url, timeout=SLACK) as http:
            posted = http.post(
                "/api/v1/save-message",
                json={"message": "still served", "runAt": now_ms() + 60_000, "uuid": uid},
            )
        assert posted.status_code == 201, posted.text
        answer = until_closed(slow, 1 + SLACK)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert time.monotonic() - started >= 0.9
