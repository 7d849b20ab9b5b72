"""Fixtures and tools of the RabbitMQ transport tests: a unique namespace per test on
the real broker at 127.0.0.1:5672, deleted afterwards; a way to reach the broker's
management command line; closing a broker connection by name."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aio_pika
import pytest

from orchestratr_core.testing.proxy import SilentProxy
from orchestratr_rabbitmq import RabbitMQTransport
from orchestratr_rabbitmq.topology import BrokerVersion, Topology

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl`` (the tests run as root next to the broker)."""
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


_DROPPED: set[str] = set()
"""Namespaces this test session dropped: their pool queues are deleted at its end."""


async def drop_namespace(namespace: str) -> None:
    """Delete every queue and exchange of ``namespace`` (its pools' queues, whose
    names the broker alone knows, at the end of the session)."""
    names = Topology(namespace, "quorum", BrokerVersion(3, 10))
    _DROPPED.add(namespace)
    await _delete_queues(names.names())
    connection = await aio_pika.connect(BROKER_URL)
    try:
        for exchange in names.exchanges():
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(exchange)
            with contextlib.suppress(Exception):
                await channel.close()
    finally:
        await connection.close()


@pytest.fixture(scope="session", autouse=True)
def drop_pool_queues() -> Iterator[None]:
    """At the end of the session, delete the pool queues (``<ns>.jobs.<pool>``) of
    the namespaces it dropped: one ``rabbitmqctl`` call, only when there are some."""
    yield
    if not _DROPPED:
        return
    try:
        listed = rabbitmqctl("list_queues", "-q", "--no-table-headers", "name")
    except (OSError, subprocess.SubprocessError):
        return
    doomed = [
        name
        for name in (line.strip() for line in listed.splitlines())
        if any(name.startswith(f"{ns}.jobs.") for ns in _DROPPED)
    ]
    if doomed:
        asyncio.run(_delete_queues(doomed))


async def _delete_queues(queues: list[str]) -> None:
    connection = await aio_pika.connect(BROKER_URL)
    try:
        for queue in queues:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
            with contextlib.suppress(Exception):
                await channel.close()
    finally:
        await connection.close()


@pytest.fixture
async def proxy() -> AsyncIterator[SilentProxy]:
    """A silent TCP proxy to the broker (pause it to partition what goes through it)."""
    proxy = SilentProxy()
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    """A fresh namespace, dropped after the test."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    await drop_namespace(name)


@pytest.fixture
async def make_transport(namespace: str) -> AsyncIterator[Callable[..., RabbitMQTransport]]:
    """Build transports on the test's namespace; all are closed after the test."""
    made: list[RabbitMQTransport] = []

    def make(url: str | None = BROKER_URL, **options: Any) -> RabbitMQTransport:
        options.setdefault("namespace", namespace)
        transport = RabbitMQTransport(url, **options)
        made.append(transport)
        return transport

    yield make
    for transport in reversed(made):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(transport.close(), 15)


@pytest.fixture
async def broker() -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    """A plain aio-pika connection for looking at queues directly."""
    connection = await aio_pika.connect(BROKER_URL)
    yield connection
    await connection.close()


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
