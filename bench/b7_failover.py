"""B7: failover. kill -9 of the leading scheduler during a steady 100 msgs/s load
(each due 2 s after posting); max lateness, seconds without a leader, lost.

Baseline: the session timeout (EAT_ZK_SESSION_TIMEOUT, 2 s here), which bounds
how long the dead leader's election node lives.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from bench.b4_steady import post_at_rate
from bench.common import percentile, print_table, stack, write_result

SESSION = 2.0


def leader_name(s) -> str | None:
    """The scheduler whose latest leadership line says it leads."""
    best: tuple[str, str] | None = None
    for name, proc in s.processes:
        if not name.startswith("scheduler") or proc.poll() is not None:
            continue
        for raw in (s.workdir / f"{name}.err").read_bytes().splitlines():
            if b"leadership acquired" in raw:
                at = json.loads(raw)["timestamp"]
                if best is None or at > best[0]:
                    best = (at, name)
    return best[1] if best else None


def run(rate: float = 100.0, seconds: float = 20.0) -> dict:
    with stack(zk_session_timeout=str(SESSION)) as s:
        url = s.api() + "/api/v1/save-message"
        s.serve(schedulers=3, workers=2)
        killed: dict[str, float] = {}

        def kill_leader_later() -> None:
            time.sleep(seconds / 3)
            name = leader_name(s)
            proc = dict(s.processes)[name]
            killed["at"] = time.time()
            proc.kill()

        killer = threading.Thread(target=kill_leader_later)
        killer.start()
        accepted = asyncio.run(post_at_rate(url, rate, seconds, 2000))
        killer.join()
        lines = s.wait_for_echoes(lambda ls: accepted <= {e["uuid"] for e in ls}, 20)
        acquired = []
        for name, _ in s.processes:
            if name.startswith("scheduler"):
                for raw in (s.workdir / f"{name}.err").read_bytes().splitlines():
                    if b"leadership acquired" in raw:
                        acquired.append(json.loads(raw)["timestamp"])
    from datetime import datetime

    times = sorted(datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() for t in acquired)
    after = [t for t in times if t > killed["at"]]
    no_leader = (after[0] - killed["at"]) if after else float("nan")
    late = [e["handledAt"] - e["runAt"] for e in lines if e["uuid"] in accepted]
    result = {
        "posted": len(accepted),
        "lost": len(accepted - {e["uuid"] for e in lines}),
        "early": sum(1 for x in late if x < 0),
        "p50_ms": percentile(late, 50),
        "max_ms": max(late, default=float("nan")),
        "no_leader_s": no_leader,
        "session_s": SESSION,
    }
    print_table(
        f"B7 kill -9 of the leader during {rate:g} msgs/s "
        "(target: max lateness <= session timeout + 1 s, lost 0)",
        ("posted", "lost", "early", "p50 ms", "max ms", "s without leader", "session s (baseline)"),
        [tuple(result.values())],
    )
    write_result("b7", result)
    return result


if __name__ == "__main__":
    run()
