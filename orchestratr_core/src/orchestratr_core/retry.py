"""The one retry/backoff policy, used by runtimes and backends alike."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from types import TracebackType

from orchestratr_core.errors import BackendUnavailable

__all__ = ["Attempt", "backoff_delay", "retrying"]

log = logging.getLogger("orchestratr")


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Exponential backoff from ``initial`` (attempt 1), capped at ``maximum``, with
    jitter in [50 %, 100 %] so that a fleet does not retry in lock-step."""
    base = min(maximum, initial * 2.0 ** max(0, attempt - 1))
    return base * (0.5 + random.random() / 2)


class Attempt:
    """One try of a :func:`retrying` loop: ``with attempt:`` around the work keeps a
    retryable error for the loop instead of raising it."""

    __slots__ = ("_retry_on", "error", "number")

    def __init__(self, number: int, retry_on: tuple[type[BaseException], ...]) -> None:
        self.number = number
        """1 for the first try."""
        self.error: BaseException | None = None
        """The retryable error this try ended with, if any."""
        self._retry_on = retry_on

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if exc is not None and isinstance(exc, self._retry_on):
            self.error = exc
            return True
        return False


async def retrying(
    what: str,
    *,
    initial: float = 0.5,
    maximum: float = 30.0,
    retry_on: tuple[type[BaseException], ...] | None = None,
    logger: logging.Logger | None = None,
    attempts: int | None = None,
) -> AsyncIterator[Attempt]:
    """Tries of one action under the one backoff policy (APScheduler 4's idiom)::

        async for attempt in retrying("connect to the broker", maximum=30):
            with attempt:
                await transport.connect()

    The loop ends after the first try that raised nothing retryable. A retryable
    error (``BackendUnavailable`` unless ``retry_on`` says otherwise) is logged as
    one warning line with the delay, then waited out with :func:`backoff_delay`;
    any other error propagates at once. With ``attempts``, the last retryable error
    is raised after that many tries.
    """
    if retry_on is None:
        retry_on = (BackendUnavailable,)
    logger = logger or log
    number = 0
    while True:
        number += 1
        attempt = Attempt(number, retry_on)
        yield attempt
        if attempt.error is None:
            return
        if attempts is not None and number >= attempts:
            raise attempt.error
        delay = backoff_delay(number, initial, maximum)
        logger.warning("cannot %s (%s); retrying in %.1f s", what, attempt.error, delay)
        await asyncio.sleep(delay)
