"""The one retry/backoff policy, used by runtimes and backends alike."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator
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
    wait_first: bool = False,
    quiet_repeats: bool = False,
    within: float | None = None,
    level: int = logging.WARNING,
) -> AsyncGenerator[Attempt, None]:
    """Tries of one action under the one backoff policy (APScheduler 4's idiom)::

        async for attempt in retrying("connect to the broker", maximum=30):
            with attempt:
                await transport.connect()

    The loop ends after the first try that raised nothing retryable. A retryable
    error (``BackendUnavailable`` unless ``retry_on`` says otherwise) is logged as
    one warning line with the delay, then waited out with :func:`backoff_delay`;
    any other error propagates at once. With ``attempts``, the last retryable error
    is raised after that many tries. With ``wait_first`` the first try waits its
    delay too (a reconnect after a loss: not at once, and not in lock-step); with
    ``quiet_repeats`` an error worded as the one before is logged at DEBUG only (a
    long outage is one warning, not one a backoff). With ``within``, the last
    retryable error is raised once a try fails that many seconds after the first
    began. ``level`` is that of the retry lines (DEBUG where retrying is routine).
    """
    if retry_on is None:
        retry_on = (BackendUnavailable,)
    logger = logger or log
    shift = 1 if wait_first else 0
    started = asyncio.get_running_loop().time()
    if wait_first:
        await asyncio.sleep(backoff_delay(1, initial, maximum))
    number = 0
    last = ""
    while True:
        number += 1
        attempt = Attempt(number, retry_on)
        yield attempt
        if attempt.error is None:
            return
        if attempts is not None and number >= attempts:
            raise attempt.error
        if within is not None and asyncio.get_running_loop().time() - started > within:
            raise attempt.error
        delay = backoff_delay(number + shift, initial, maximum)
        text = str(attempt.error)
        quiet = quiet_repeats and text == last
        last = text
        logger.log(
            logging.DEBUG if quiet else level,
            "cannot %s (%s); retrying in %.1f s",
            what,
            attempt.error,
            delay,
        )
        await asyncio.sleep(delay)
