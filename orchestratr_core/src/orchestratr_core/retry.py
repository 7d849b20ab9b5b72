"""The one retry/backoff policy, used by runtimes and backends alike."""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Exponential backoff from ``initial`` (attempt 1), capped at ``maximum``, with
    jitter in [50 %, 100 %] so that a fleet does not retry in lock-step."""
    base = min(maximum, initial * 2.0 ** max(0, attempt - 1))
    return base * (0.5 + random.random() / 2)
