"""Retry policy: how long to wait after the n-th failed attempt. Pure; randomness injected."""

from __future__ import annotations

import random
from collections.abc import Callable

from app.backoff import equal_jitter, exponential


def backoff_seconds(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random.

    ``attempt`` counts from 1 (the first failure waits about ``base``). The
    random half spreads retries of messages that failed together (an outage of
    whatever the handler calls) so they do not return as one burst; the fixed
    half keeps the delay from collapsing to zero.
    """
    return equal_jitter(exponential(attempt, base, cap), rand)
