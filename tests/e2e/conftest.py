"""Fixtures for end-to-end tests: whole clusters of real service processes."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
import redis

from tests.e2e.harness import Cluster

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures can tell a failed test."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_REPORTS, {})
    return any(report.failed for report in reports.values())


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest,
    redis_url: str,
    zk_hosts: str,
    prefix: str,
    redis_client: redis.Redis,  # its teardown deletes the prefix's keys, after ours
    tmp_path: Path,
) -> Iterator[Callable[..., Cluster]]:
    """Factory: ``cluster(apis=1, schedulers=2, workers=2, **start_options)`` starts
    a :class:`Cluster` on this test's prefix and waits until it is ready (and led).

    Every cluster made is stopped at teardown, whatever the test did (SIGTERM,
    then SIGKILL after the grace period). When the test failed, the tail of each
    process's stderr is printed (pytest shows it under "Captured stdout teardown").
    """
    made: list[Cluster] = []

    def make(
        apis: int = 1,
        schedulers: int = 2,
        workers: int = 2,
        *,
        session_timeout: float = 2.0,
        env: dict[str, str] | None = None,
        **start_options: object,
    ) -> Cluster:
        instance = Cluster(
            redis_url,
            zk_hosts,
            prefix,
            tmp_path / f"cluster-{len(made) + 1}",
            session_timeout=session_timeout,
            env=env,
        )
        made.append(instance)
        instance.start(apis, schedulers, workers, **start_options)  # type: ignore[arg-type]
        return instance

    try:
        yield make
    finally:
        for instance in made:
            instance.stop()
        if _failed(request):
            for instance in made:
                print(f"\n===== cluster in {instance.workdir} =====")
                print(instance.describe(lines=60))
