"""Test tools: closing a broker connection by name; the silent TCP proxy now
ships with the core (``orchestratr_core.testing.proxy``) for backend authors too."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from orchestratr_core.testing.proxy import SilentProxy
from tests.rabbitmq.conftest import rabbitmqctl

__all__ = ["SilentProxy", "close_connections", "eventually"]


def close_connections(connection_name: str, reason: str = "closed by test") -> int:
    """Close, from the broker side, every connection whose client named it so."""
    out = rabbitmqctl("list_connections", "--no-table-headers", "-q", "pid", "client_properties")
    closed = 0
    for line in out.splitlines():
        pid, _, properties = line.partition("\t")
        if f'{{"connection_name","{connection_name}"}}' in properties:
            rabbitmqctl("close_connection", pid.strip(), reason)
            closed += 1
    return closed


async def eventually(predicate: Callable[[], bool], within: float, what: str) -> float:
    """Wait until ``predicate()`` holds; return the loop time when it did."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)
    return loop.time()
