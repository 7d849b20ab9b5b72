"""Types, a collecting handler, messages and settings shared by the transport conformance mixins."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, Literal, TypeVar

import pytest

from orchestratr_core.protocol import JobMessage, JobStarted, ReleaseJobs
from orchestratr_core.transport import Transport

_T = TypeVar("_T")

TransportFactory = Callable[[], Transport]
"""Builds a new, not yet connected transport on the test's broker namespace."""

QueueKind = Literal["jobs", "events", "commands"]
"""Where :data:`RawPublisher` puts bytes (``"commands"``: broadcast to every server)."""

RawPublisher = Callable[[QueueKind, bytes], Awaitable[None]]
"""Puts raw bytes on a queue, bypassing the codec."""


class Collector(Generic[_T]):
    """A handler that records what it is given, and waits for it in tests."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.items: list[_T] = []
        self._queue: asyncio.Queue[_T] = asyncio.Queue()

    async def __call__(self, item: _T) -> None:
        """The handler: record ``item``."""
        self.items.append(item)
        self._queue.put_nowait(item)

    async def next(self) -> _T:
        """The next item received (waits up to ``timeout`` seconds)."""
        try:
            return await asyncio.wait_for(self._queue.get(), self.timeout)
        except TimeoutError:
            pytest.fail(f"nothing arrived within {self.timeout} s (so far: {self.items!r})")

    async def take(self, count: int) -> list[_T]:
        """The next ``count`` items received."""
        return [await self.next() for _ in range(count)]

    async def quiet(self, seconds: float) -> None:
        """Fail if anything arrives within ``seconds``."""
        try:
            item = await asyncio.wait_for(self._queue.get(), seconds)
        except TimeoutError:
            return
        pytest.fail(f"unexpected arrival: {item!r}")


def _job(tag: str, number: int = 0, generation: int = 1) -> JobMessage:
    return JobMessage(
        job_id=f"{tag}-{number}",
        name=f"job {number} of {tag} \u00fcn\u00efc\u00f6de \u2603",
        argument=f'{{"n": {number}, "text": "a\\nb"}}',
        generation=generation,
        created_at=1_700_000_000.5 + number,
        heartbeat_timeout=30.0 if number % 2 else None,
    )


def _event(server_id: str, number: int) -> JobStarted:
    return JobStarted(server_id=server_id, job_id=f"job-{number}", fence=number, at=float(number))


_MARKER = ReleaseJobs(count=0, hold=None)


class SuiteSettings:
    """The suite's waiting times, shared by every section (override in the subclass)."""

    delivery_timeout: float = 10.0
    """Longest wait for something that must arrive."""
    settle_time: float = 0.3
    """How long a check that nothing arrives watches."""
