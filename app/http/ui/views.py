"""What the templates show, computed from the storage core's plain data: times as
text, the charts' series, the date-time a form posts. Pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from app.model import RUN_AT_MAX, RUN_AT_MIN, InvalidInput
from app.store.history import Minute

FORM_TIME = "%Y-%m-%dT%H:%M:%S"


def when(ms: int | None) -> str:
    """Epoch ms as UTC text, to the millisecond."""
    if ms is None:
        return "—"
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{ms % 1000:03d} UTC"


def span(ms: int | None) -> str:
    """A duration in the largest unit that keeps it short: 850 ms, 4.2 s, 3 min, 5 h, 2 d."""
    if ms is None:
        return "—"
    ms = abs(int(ms))
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    if ms < 3_600_000:
        return f"{ms // 60_000} min"
    if ms < 86_400_000:
        return f"{ms / 3_600_000:.1f} h"
    return f"{ms / 86_400_000:.1f} d"


def relative(ms: int | None, now_ms: int) -> str:
    """ "in 3 s" or "3 s ago", against ``now_ms``."""
    if ms is None:
        return ""
    return f"in {span(ms - now_ms)}" if ms > now_ms else f"{span(now_ms - ms)} ago"


def form_time(ms: int) -> str:
    """Epoch ms as a ``datetime-local`` input's value, in UTC, to the second."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime(FORM_TIME)


def parse_form_time(text: str) -> int:
    """A ``datetime-local`` value (read as UTC; seconds and milliseconds optional) as
    epoch ms; InvalidInput naming ``run_at`` otherwise."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(
            "runAt must be a date and time like 2030-01-31T12:00:00", "run_at"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    ms = round(moment.timestamp() * 1000)
    if not RUN_AT_MIN <= ms <= RUN_AT_MAX:
        raise InvalidInput("runAt is out of range", "run_at")
    return ms


def chart_series(minutes: Sequence[Minute]) -> dict[str, list]:
    """The charts' data, one value per minute (uPlot's columns): counts per minute, and
    lateness p50/p99 in milliseconds (null where nothing was handled)."""

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 1)

    return {
        "t": [m.start for m in minutes],
        "accepted": [m.accepted for m in minutes],
        "delivered": [m.delivered for m in minutes],
        "failed": [m.failed for m in minutes],
        "dead": [m.dead for m in minutes],
        "p50": [ms(m.lateness_quantile(0.5)) for m in minutes],
        "p99": [ms(m.lateness_quantile(0.99)) for m in minutes],
    }


def safe_back(path: str | None, default: str) -> str:
    """Where an action sends the browser afterwards: a path of this dashboard only (no
    scheme, no host, no ``//``), else ``default``."""
    if (
        path
        and path.startswith("/ui")
        and (len(path) == 3 or path[3] in "/?")
        and "//" not in path
        and "\\" not in path
        and path.isprintable()
    ):
        return path
    return default
