"""Fixtures and tools of the RabbitMQ transport tests: a unique namespace per test on
the real broker (127.0.0.1:5672, or the one ``ORCHESTRATR_TEST_BROKER`` names), deleted
afterwards; a way to reach the broker's
management command line; closing a broker connection by name."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from orchestratr_core.testing.proxy import SilentProxy
from orchestratr_rabbitmq import RabbitMQTransport
from orchestratr_rabbitmq.settings import Settings
from orchestratr_rabbitmq.topology import BrokerVersion, Topology

BROKER_ENV = "ORCHESTRATR_TEST_BROKER"
"""Names the ``.ci/infra`` broker the RabbitMQ tests run against (``rabbitmq4``:
RabbitMQ 4.0.5; ``rabbitmq-cluster``: the three 3.10.8 nodes); unset or empty: the
shared 3.10.8 node at 127.0.0.1:5672. The infrastructure must be up."""
INFRA = Path(__file__).resolve().parents[2] / ".ci" / "infra"


def infra(name: str, *args: str, timeout: float = 60) -> str:
    """Run ``bash .ci/infra NAME ARGS...``; return what it printed."""
    done = subprocess.run(
        ["bash", str(INFRA), name, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f".ci/infra {name} {' '.join(args)} failed: {done.stderr[-2000:]}")
    return done.stdout


def _broker() -> tuple[str, list[str]]:
    """The broker under test: its URL and the command that runs rabbitmqctl on it."""
    name = os.environ.get(BROKER_ENV, "").strip()
    if not name:
        return "amqp://guest:guest@127.0.0.1:5672/", ["rabbitmqctl"]
    url = infra(name, "url").strip().splitlines()[-1]
    return url, ["bash", str(INFRA), name, "rabbitmqctl"]


BROKER_URL, _RABBITMQCTL = _broker()


def broker_address(url: str | None = None) -> tuple[str, int]:
    """Host and port of the first node of ``url`` (default: the broker under test)."""
    node = Settings.build(url or BROKER_URL, {}).nodes[0]
    host, _, port = node.rpartition(":")
    return host, int(port)


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl`` on the broker under test (the tests run as root next to it)."""
    done = subprocess.run(
        [*_RABBITMQCTL, *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


async def connect_any(url: str) -> aio_pika.abc.AbstractConnection:
    """A plain aio-pika connection to the first node of ``url`` that answers."""
    settings = Settings.build(url, {})
    error: Exception | None = None
    for node in range(len(settings.nodes)):
        try:
            return await aio_pika.connect(settings.connection_url(node), timeout=10)
        except Exception as exc:
            error = exc
    assert error is not None
    raise error


_DROPPED: set[str] = set()
"""Namespaces this test session dropped: their pool queues are deleted at its end."""


async def drop_namespace(namespace: str, url: str | None = None) -> None:
    """Delete every queue and exchange of ``namespace`` (on ``url``, default the
    broker under test; its pools' queues, whose names the broker alone knows, at
    the end of the session)."""
    names = Topology(namespace, "quorum", BrokerVersion(3, 10))
    _DROPPED.add(namespace)
    await _delete_queues(names.names(), url)
    connection = await connect_any(url or BROKER_URL)
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


async def _delete_queues(queues: list[str], url: str | None = None) -> None:
    connection = await connect_any(url or BROKER_URL)
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
    """A silent TCP proxy to the broker under test (pause it to partition what goes
    through it)."""
    proxy = SilentProxy(*broker_address())
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
