"""HttpLimits from the settings, its sweep interval, and the connection cap fitted to
the open files limit (in a child process, whose limit the test sets)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

from app.httpserver import RESERVED_FDS, HttpLimits
from app.settings import Settings


def test_limits_come_from_the_http_settings() -> None:
    settings = Settings.from_env(
        {
            "EAT_HTTP_MAX_HEADER_BYTES": "8192",
            "EAT_HTTP_HEADER_TIMEOUT": "3",
            "EAT_HTTP_BODY_TIMEOUT": "7",
            "EAT_HTTP_SEND_TIMEOUT": "11",
            "EAT_HTTP_IDLE_TIMEOUT": "2",
            "EAT_HTTP_MAX_CONNECTIONS": "50",
        }
    )
    assert HttpLimits.of(settings) == HttpLimits(
        max_header_bytes=8192,
        header_timeout=3.0,
        body_timeout=7.0,
        send_timeout=11.0,
        idle_timeout=2.0,
        max_connections=50,
    )
    assert HttpLimits.of(Settings()) == HttpLimits()


@pytest.mark.parametrize(
    ("timeouts", "tick"),
    [
        ((10, 30, 30, 5), 1.0),
        ((0.5, 30, 30, 5), 0.1),
        ((10, 30, 0.5, 5), 0.1),
        ((0.01, 0.01, 0.01, 0.01), 0.05),
    ],
)
def test_deadlines_are_swept_at_a_fifth_of_the_shortest_limit_between_50_ms_and_1_s(
    timeouts: tuple[float, float, float, float], tick: float
) -> None:
    header, body, send, idle = timeouts
    limits = HttpLimits(
        header_timeout=header, body_timeout=body, send_timeout=send, idle_timeout=idle
    )
    assert limits.tick == pytest.approx(tick)


FIT = """
import json, resource, sys
from app.httpserver import HttpLimits, fit_open_files
limits = fit_open_files(HttpLimits(max_connections=int(sys.argv[1])))
print(json.dumps([limits.max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))
"""


def fit_in_child(max_connections: int, soft: int, hard: int) -> tuple[int, int]:
    """(the cap, the soft open files limit) a process with that limit ends up with."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    out = subprocess.run(
        [sys.executable, "-c", FIT, str(max_connections)],
        preexec_fn=limit,  # only sets a limit in the child
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    cap, fitted_soft = json.loads(out.splitlines()[-1])
    return cap, fitted_soft


def test_the_open_files_limit_is_raised_to_fit_the_connection_cap() -> None:
    assert fit_in_child(500, 256, 1024) == (500, 500 + RESERVED_FDS)


def test_a_connection_cap_past_the_hard_open_files_limit_is_lowered_to_fit() -> None:
    assert fit_in_child(1000, 256, 512) == (512 - RESERVED_FDS, 512)


def test_a_connection_cap_within_the_open_files_limit_is_kept() -> None:
    assert fit_in_child(100, 512, 512) == (100, 512)
