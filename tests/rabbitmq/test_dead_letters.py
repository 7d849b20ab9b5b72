"""The dead-letter queue ``<ns>.dead`` on the real broker (issue 11): an event the
manager refuses for good goes there instead of being redelivered, the queue is
bounded (the oldest dropped first), and a queue an older version declared
without a bound is upgraded, or kept with a warning, never refused."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aio_pika
import pytest

from orchestratr_core.errors import DeadLetter
from orchestratr_core.protocol import Event, JobStarted, encode
from orchestratr_rabbitmq import RabbitMQTransport
from orchestratr_rabbitmq.topology import DEAD_LETTER_LIMIT
from tests.support.rabbitmq import eventually, rabbitmqctl

pytestmark = pytest.mark.rabbitmq

MakeTransport = Callable[..., RabbitMQTransport]


def _started(number: int) -> JobStarted:
    return JobStarted(server_id="s", job_id=f"job-{number}", fence=number, at=1.0)


async def _dead_bodies(broker: aio_pika.abc.AbstractConnection, namespace: str) -> list[bytes]:
    """Every message in ``<ns>.dead``, oldest first (taken off the queue)."""
    channel = await broker.channel()
    dead = await channel.declare_queue(f"{namespace}.dead", passive=True)
    bodies = []
    while (message := await dead.get(timeout=5, fail=False)) is not None:
        bodies.append(message.body)
        await message.ack()
    await channel.close()
    return bodies


def _dead_arguments(namespace: str) -> str:
    """The arguments ``<ns>.dead`` was declared with, as ``rabbitmqctl`` prints them."""
    for line in rabbitmqctl("list_queues", "-q", "name", "arguments").splitlines():
        name, _, arguments = line.partition("\t")
        if name == f"{namespace}.dead":
            return arguments
    raise AssertionError(f"{namespace}.dead does not exist")


async def _publish_events(
    broker: aio_pika.abc.AbstractConnection, namespace: str, bodies: list[bytes]
) -> None:
    channel = await broker.channel(publisher_confirms=True)
    for body in bodies:
        await channel.default_exchange.publish(aio_pika.Message(body), f"{namespace}.events")
    await channel.close()


async def test_an_event_the_handler_refuses_for_good_goes_to_the_dead_queue_once(
    make_transport: MakeTransport,
    broker: aio_pika.abc.AbstractConnection,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager, server = make_transport(), make_transport()
    await manager.connect()
    await server.connect()
    handled: list[int] = []
    attempts: list[int] = []

    async def handle(event: Event) -> None:
        assert isinstance(event, JobStarted)
        attempts.append(event.fence)
        if event.fence == 1:
            raise DeadLetter("started event of server s, job job-1 refused by the storage")
        handled.append(event.fence)

    caplog.set_level(logging.WARNING, "orchestratr")
    await manager.consume_events(handle)
    for n in range(3):
        await server.publish_event(_started(n))
    await eventually(lambda: handled == [0, 2], 10, what="events 0 and 2 handled")
    assert attempts == [0, 1, 2]
    assert await _dead_bodies(broker, namespace) == [encode(_started(1))]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "job job-1" in warnings[0] and f"{namespace}.dead" in warnings[0]


async def test_the_dead_queue_is_bounded_and_drops_the_oldest_first(
    make_transport: MakeTransport, broker: aio_pika.abc.AbstractConnection, namespace: str
) -> None:
    manager = make_transport(dead_letter_limit=3)
    await manager.connect()
    arguments = _dead_arguments(namespace)
    assert "x-max-length" in arguments and "drop-head" in arguments
    events: list[Event] = []

    async def handle(event: Event) -> None:
        events.append(event)

    await manager.consume_events(handle)
    await _publish_events(broker, namespace, [b"bad %d" % n for n in range(5)])
    await _publish_events(broker, namespace, [encode(_started(9))])
    await eventually(lambda: events == [_started(9)], 10, what="the good event after the bad")
    assert await _dead_bodies(broker, namespace) == [b"bad 2", b"bad 3", b"bad 4"]


async def test_the_default_bound_is_documented() -> None:
    assert RabbitMQTransport(namespace="x").settings.dead_letter_limit == DEAD_LETTER_LIMIT
    assert DEAD_LETTER_LIMIT == 10_000


async def test_an_empty_unbounded_dead_queue_of_an_older_version_is_replaced_by_a_bounded_one(
    make_transport: MakeTransport, broker: aio_pika.abc.AbstractConnection, namespace: str
) -> None:
    channel = await broker.channel()
    await channel.declare_queue(
        f"{namespace}.dead", durable=True, arguments={"x-queue-type": "classic"}
    )
    manager = make_transport(dead_letter_limit=2)
    await manager.connect()
    assert "x-max-length" in _dead_arguments(namespace)
    await manager.consume_events(lambda event: _noop())
    await _publish_events(broker, namespace, [b"bad %d" % n for n in range(4)])
    await _drained(broker, f"{namespace}.events")
    assert await _dead_bodies(broker, namespace) == [b"bad 2", b"bad 3"]


def _queue_type(name: str) -> str:
    for line in rabbitmqctl("list_queues", "-q", "name", "type").splitlines():
        queue, _, kind = line.partition("\t")
        if queue == name:
            return kind.strip()
    raise AssertionError(f"{name} does not exist")


async def test_the_dead_queue_of_a_quorum_namespace_is_a_quorum_queue(
    make_transport: MakeTransport, namespace: str
) -> None:
    # A classic queue lives on one node: while it is down a manager could not
    # declare its namespace (docs/reliability.md, "RabbitMQ cluster").
    manager = make_transport()
    await manager.connect()
    assert _queue_type(f"{namespace}.dead") == "quorum"
    arguments = _dead_arguments(namespace)
    assert "x-max-length" in arguments and "drop-head" in arguments
    assert str(256 * 1024 * 1024) in arguments


async def test_an_empty_bounded_classic_dead_queue_of_the_last_version_becomes_quorum(
    make_transport: MakeTransport, broker: aio_pika.abc.AbstractConnection, namespace: str
) -> None:
    channel = await broker.channel()
    await channel.declare_queue(
        f"{namespace}.dead",
        durable=True,
        arguments={
            "x-queue-type": "classic",
            "x-max-length": 10_000,
            "x-max-length-bytes": 256 * 1024 * 1024,
            "x-overflow": "drop-head",
        },
    )
    manager = make_transport(dead_letter_limit=2)
    await manager.connect()
    assert _queue_type(f"{namespace}.dead") == "quorum"
    await manager.consume_events(lambda event: _noop())
    await _publish_events(broker, namespace, [b"bad %d" % n for n in range(4)])
    await _drained(broker, f"{namespace}.events")
    assert await _dead_bodies(broker, namespace) == [b"bad 2", b"bad 3"]


async def test_a_non_empty_unbounded_dead_queue_is_kept_as_it_is_with_a_warning(
    make_transport: MakeTransport,
    broker: aio_pika.abc.AbstractConnection,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    channel = await broker.channel(publisher_confirms=True)
    await channel.declare_queue(
        f"{namespace}.dead", durable=True, arguments={"x-queue-type": "classic"}
    )
    await channel.default_exchange.publish(aio_pika.Message(b"kept"), f"{namespace}.dead")
    caplog.set_level(logging.WARNING, "orchestratr")
    manager = make_transport(dead_letter_limit=2)
    await manager.connect()  # a deployment never fails to start over its dead letters
    warnings = [r.getMessage() for r in caplog.records if "no length limit" in r.getMessage()]
    assert len(warnings) == 1 and "docs/rabbitmq.md" in warnings[0]
    assert "x-max-length" not in _dead_arguments(namespace)
    await manager.consume_events(lambda event: _noop())
    await _publish_events(broker, namespace, [b"bad"])
    await _drained(broker, f"{namespace}.events")
    assert await _dead_bodies(broker, namespace) == [b"kept", b"bad"]


async def _noop() -> None:
    return None


async def _drained(broker: aio_pika.abc.AbstractConnection, name: str) -> None:
    """Wait until queue ``name`` is empty and nothing in it is unacknowledged."""
    channel = await broker.channel()
    for _ in range(200):
        queue = await channel.declare_queue(name, passive=True)
        if queue.declaration_result.message_count == 0:
            await asyncio.sleep(0.2)  # let an unacknowledged one settle
            queue = await channel.declare_queue(name, passive=True)
            if queue.declaration_result.message_count == 0:
                await channel.close()
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never drained")
