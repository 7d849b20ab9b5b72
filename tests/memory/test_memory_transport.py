# Over 600 lines: the conformance suite, then one section per fault the memory broker models.
"""The in-memory transport: the conformance suite, then every fault it models."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from orchestratr_core.errors import (
    BackendUnavailable,
    ConfigurationError,
    DeliveryLost,
    PermanentBackendError,
    PublishError,
)
from orchestratr_core.plugin import BackendSpec
from orchestratr_core.protocol import (
    CancelJob,
    Command,
    Event,
    JobMessage,
    JobStarted,
    ReleaseJobs,
    encode,
)
from orchestratr_core.testing import TransportConformance
from orchestratr_core.testing.transport_suite import (
    Collector,
    QueueKind,
    RawPublisher,
    TransportFactory,
)
from orchestratr_core.transport import Delivery
from orchestratr_memory import plugin as memory_plugin
from orchestratr_memory.broker import DEAD_LETTER_LIMIT, DeadLetter, MemoryBroker
from orchestratr_memory.transport import DEFAULT_OPTIONS, MemoryTransport

WAIT = 5.0
FAST = "fence_timeout=0.2&broker_timeout=0.5&reconnect_delay=0.02&reconnect_max_delay=0.1"
"""Fault timings for these tests: the client fences at 0.2 s, the broker requeues at 0.5 s."""


@pytest.fixture
def broker_name() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def broker(broker_name: str) -> MemoryBroker:
    return MemoryBroker.get(broker_name)


class TestMemoryTransportConformance(TransportConformance):
    """The reference transport passes the whole conformance suite."""

    settle_time = 0.1  # the memory broker hands out synchronously: nothing arrives late

    @pytest.fixture
    async def transport_factory(self, broker_name: str) -> AsyncIterator[TransportFactory]:
        made: list[MemoryTransport] = []

        def make() -> MemoryTransport:
            transport = MemoryTransport(f"memory://{broker_name}")
            made.append(transport)
            return transport

        yield make
        for transport in made:
            await transport.close()
        MemoryBroker.reset(broker_name)

    @pytest.fixture
    def raw_publisher(self, broker: MemoryBroker) -> RawPublisher:
        async def publish(kind: QueueKind, payload: bytes) -> None:
            broker.inject_raw(kind, payload)

        return publish


Connect = Callable[..., Awaitable[MemoryTransport]]


@pytest.fixture
async def connect(broker_name: str) -> AsyncIterator[Connect]:
    """``await connect(query)``: a connected transport on this test's broker."""
    made: list[MemoryTransport] = []

    async def make(query: str = FAST) -> MemoryTransport:
        transport = MemoryTransport(f"memory://{broker_name}?{query}")
        made.append(transport)
        await transport.connect()
        return transport

    yield make
    for transport in made:
        transport.heal()
        await transport.close()
    MemoryBroker.reset(broker_name)


def job(number: int) -> JobMessage:
    return JobMessage(
        job_id=f"job-{number}", name=f"job {number}", argument="", generation=1, created_at=0.0
    )


def started(number: int) -> JobStarted:
    return JobStarted(server_id="s", job_id=f"job-{number}", fence=number, at=0.0)


def collector() -> Collector[Any]:
    return Collector(WAIT)


async def wait_lost(delivery: Delivery) -> float:
    """Wait until ``delivery`` is lost; return the loop time it happened."""
    await asyncio.wait_for(delivery.lost.wait(), WAIT)
    return asyncio.get_running_loop().time()


# -- configuration ---------------------------------------------------------------------


def test_url_names_the_broker_and_carries_options() -> None:
    assert MemoryTransport().broker is MemoryBroker.get("default")
    assert MemoryTransport("memory://").broker is MemoryBroker.get(None)
    transport = MemoryTransport("memory://named?fence_timeout=0.5&broker_timeout=1")
    assert transport.broker is MemoryBroker.get("named")
    assert (transport.fence_timeout, transport.broker_timeout) == (0.5, 1.0)
    assert transport.options["reconnect_delay"] == DEFAULT_OPTIONS["reconnect_delay"]
    overridden = MemoryTransport("memory://named?fence_timeout=0.5", fence_timeout=0.25)
    assert overridden.fence_timeout == 0.25
    assert MemoryTransport().fence_timeout < MemoryTransport().broker_timeout


@pytest.mark.parametrize(
    ("url", "options", "complaint"),
    [
        ("memory://x?fence_timeout=3&broker_timeout=3", {}, "smaller than broker_timeout"),
        ("memory://x", {"fence_timeout": 4.0}, "smaller than broker_timeout"),
        ("memory://x?prefetch=3", {}, "unknown memory transport option"),
        ("memory://x", {"colour": "blue"}, "unknown memory transport option"),
        ("memory://x?fence_timeout=soon", {}, "number of seconds"),
        ("memory://x?broker_timeout=-1", {}, "must be > 0"),
        ("amqp://guest:secret@localhost/", {}, "memory:// URLs"),
    ],
)
def test_bad_urls_and_options_are_rejected(
    url: str, options: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ConfigurationError, match=complaint) as caught:
        MemoryTransport(url, **options)
    assert "secret" not in str(caught.value)


def test_the_plugin_hook_builds_a_memory_transport() -> None:
    spec = BackendSpec("memory", url="memory://hooked", options={"broker_timeout": 9.0})
    transport = memory_plugin.orchestratr_make_transport(spec)
    assert isinstance(transport, MemoryTransport)
    assert transport.broker is MemoryBroker.get("hooked")
    assert transport.broker_timeout == 9.0


def test_brokers_are_process_global_by_name_and_reset_forgets_them() -> None:
    first = MemoryBroker.get("registry-test")
    assert MemoryBroker.get("registry-test") is first
    assert MemoryBroker.get("") is MemoryBroker.get(None) is MemoryBroker.get("default")
    MemoryBroker.reset("registry-test")
    assert MemoryBroker.get("registry-test") is not first


async def test_a_transport_must_be_connected_and_is_dead_after_close(broker_name: str) -> None:
    transport = MemoryTransport(f"memory://{broker_name}")
    with pytest.raises(BackendUnavailable, match="connect"):
        await transport.publish_job(job(1))
    await transport.connect()
    await transport.connect()  # idempotent
    await transport.close()
    await transport.close()  # idempotent
    with pytest.raises(PermanentBackendError, match="closed"):
        await transport.publish_job(job(1))
    with pytest.raises(PermanentBackendError):
        await transport.connect()


# -- broker behaviour -----------------------------------------------------------------


async def test_jobs_go_round_robin_to_consumers_with_free_capacity(
    connect: Connect, broker: MemoryBroker
) -> None:
    manager, one, two = await connect(), await connect(), await connect()
    to_one, to_two = collector(), collector()
    await one.consume_jobs(5, to_one)
    await two.consume_jobs(1, to_two)
    for n in range(4):
        await manager.publish_job(job(n))
    await to_two.next()
    await to_one.take(3)
    assert [d.message.job_id for d in to_one.items] == ["job-0", "job-2", "job-3"]
    assert [d.message.job_id for d in to_two.items] == ["job-1"]
    assert broker.held("jobs") == 4
    assert broker.depth("jobs") == 0


async def test_a_released_job_returns_to_its_original_place_at_the_head(
    connect: Connect, broker: MemoryBroker
) -> None:
    manager, server = await connect(), await connect()
    deliveries = collector()
    consumer = await server.consume_jobs(1, deliveries)
    for n in range(3):
        await manager.publish_job(job(n))
    first = await deliveries.next()
    await consumer.set_capacity(0)
    await first.release()
    assert broker.depth("jobs") == 3
    await consumer.set_capacity(3)
    again = await deliveries.take(3)
    assert [(d.message.job_id, d.delivery_count) for d in again] == [
        ("job-0", 1),
        ("job-1", 0),
        ("job-2", 0),
    ]


async def test_settling_a_delivery_twice_is_a_programming_error(connect: Connect) -> None:
    manager, server = await connect(), await connect()
    deliveries = collector()
    await server.consume_jobs(1, deliveries)
    await manager.publish_job(job(1))
    delivery = await deliveries.next()
    await delivery.ack()
    with pytest.raises(RuntimeError, match="already settled"):
        await delivery.release()
    assert not delivery.lost.is_set()


async def test_a_job_handler_that_raises_keeps_the_delivery_held_and_the_consumer_running(
    connect: Connect, broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    manager, server = await connect(), await connect()
    seen: Collector[Delivery] = collector()

    async def handler(delivery: Delivery) -> None:
        await seen(delivery)
        if delivery.message.job_id == "job-0":
            raise RuntimeError("bug in the server (simulated)")

    await server.consume_jobs(2, handler)
    await manager.publish_job(job(0))
    await manager.publish_job(job(1))
    assert [d.message.job_id for d in await seen.take(2)] == ["job-0", "job-1"]
    assert broker.held("jobs") == 2
    assert "stays held" in caplog.text


# -- crash (kill -9) ------------------------------------------------------------------


async def test_crash_loses_every_delivery_and_the_broker_requeues_at_once(
    connect: Connect, broker: MemoryBroker
) -> None:
    manager, victim, survivor = await connect(), await connect(), await connect()
    mine = collector()
    await victim.consume_jobs(2, mine)
    await manager.publish_job(job(0))
    await manager.publish_job(job(1))
    held = await mine.take(2)
    theirs = collector()
    await survivor.consume_jobs(5, theirs)
    victim.crash()
    assert all(d.lost.is_set() for d in held)
    assert broker.held("jobs") == 2  # already with the survivor
    taken = await theirs.take(2)
    assert sorted((d.message.job_id, d.delivery_count) for d in taken) == [
        ("job-0", 1),
        ("job-1", 1),
    ]
    with pytest.raises(DeliveryLost):
        await held[0].ack()
    with pytest.raises(PermanentBackendError, match="crashed"):
        await victim.publish_job(job(2))
    victim.crash()  # idempotent, and close() after a crash is a no-op
    await victim.close()


async def test_events_held_by_a_crashed_manager_go_to_the_standby_in_order(
    connect: Connect,
) -> None:
    server, active, standby = await connect(), await connect(), await connect()
    stuck = asyncio.Event()
    first_seen: Collector[Event] = collector()

    async def hang(event: Event) -> None:
        await first_seen(event)
        await stuck.wait()  # never set: the manager dies while handling

    await active.consume_events(hang)
    taken_over: Collector[Event] = collector()
    await standby.consume_events(taken_over)
    for n in range(3):
        await server.publish_event(started(n))
    assert await first_seen.next() == started(0)
    active.crash()
    assert await taken_over.take(3) == [started(0), started(1), started(2)]


# -- silent partition -----------------------------------------------------------------


async def test_partitioned_client_fences_its_jobs_strictly_before_the_broker_requeues(
    connect: Connect, broker: MemoryBroker
) -> None:
    manager, victim, survivor = await connect(), await connect(), await connect()
    mine = collector()
    await victim.consume_jobs(1, mine)
    await manager.publish_job(job(0))
    held = await mine.next()
    loop = asyncio.get_running_loop()

    async def fenced() -> tuple[float, int, int]:
        at = await wait_lost(held)
        # Nobody else consumes yet: a requeued message would be waiting in the queue.
        return at, broker.held("jobs"), broker.depth("jobs")

    fence_watch = asyncio.create_task(fenced())
    start = loop.time()
    victim.partition()
    lost_at, held_then, waiting_then = await fence_watch
    assert (held_then, waiting_then) == (1, 0)  # the broker still had it on the victim
    assert lost_at - start >= victim.fence_timeout * 0.9

    theirs = collector()
    await survivor.consume_jobs(5, theirs)
    redelivered = await theirs.next()
    redelivered_at = loop.time()
    assert lost_at < redelivered_at
    assert redelivered_at - start >= victim.broker_timeout * 0.9
    assert redelivered.message == held.message
    assert redelivered.delivery_count == 1
    with pytest.raises(DeliveryLost):
        await held.release()


async def test_a_publish_into_a_partition_fails_once_the_client_gives_up(
    connect: Connect, broker: MemoryBroker
) -> None:
    victim = await connect()
    victim.partition()
    pending = asyncio.create_task(victim.publish_job(job(0)))
    with pytest.raises(PublishError, match="not confirmed"):
        await asyncio.wait_for(pending, WAIT)
    assert broker.depth("jobs") == 0
    with pytest.raises(BackendUnavailable, match="reconnecting"):
        await victim.publish_job(job(1))  # fails fast while reconnecting


async def test_after_heal_the_client_reconnects_and_consumes_again_with_its_capacity(
    connect: Connect,
) -> None:
    manager, victim = await connect(), await connect()
    mine = collector()
    consumer = await victim.consume_jobs(1, mine)
    await manager.publish_job(job(0))
    old = await mine.next()
    victim.partition()
    await wait_lost(old)
    assert not victim.is_connected
    await consumer.set_capacity(3)  # remembered while away
    await manager.publish_job(job(1))
    await manager.publish_job(job(2))
    victim.heal()
    await asyncio.wait_for(victim.wait_connected(), WAIT)
    back = await mine.take(3)
    assert {d.message.job_id for d in back} == {"job-0", "job-1", "job-2"}
    assert all(d is not old and not d.lost.is_set() for d in back)
    again = next(d for d in back if d.message.job_id == "job-0")
    assert again.delivery_count == 1
    await victim.publish_event(started(1))  # the connection works both ways again


async def test_a_partition_healed_before_the_fence_timeout_loses_nothing(
    connect: Connect, broker: MemoryBroker
) -> None:
    manager, server = await connect(), await connect()
    deliveries = collector()
    events: Collector[Event] = collector()
    await manager.consume_events(events)
    await server.consume_jobs(2, deliveries)
    await manager.publish_job(job(0))
    first = await deliveries.next()
    server.partition()
    await first.ack()  # waits in the network
    await manager.publish_job(job(1))  # handed to the server, waits in the network
    publishing = asyncio.create_task(server.publish_event(started(1)))
    await deliveries.quiet(0.05)
    assert not publishing.done()
    assert broker.held("jobs") == 2
    server.heal()
    await asyncio.wait_for(publishing, WAIT)
    assert (await deliveries.next()).message == job(1)
    assert await events.next() == started(1)
    assert not first.lost.is_set()
    assert broker.held("jobs") == 1
    assert broker.depth("jobs") == 0


async def test_closing_during_a_partition_fences_at_once_and_the_broker_requeues_later(
    connect: Connect,
) -> None:
    manager, victim, survivor = await connect(), await connect(), await connect()
    mine = collector()
    await victim.consume_jobs(1, mine)
    await manager.publish_job(job(0))
    held = await mine.next()
    theirs = collector()
    await survivor.consume_jobs(1, theirs)
    loop = asyncio.get_running_loop()
    start = loop.time()
    victim.partition()
    await victim.close()
    assert held.lost.is_set()
    await theirs.next()
    assert loop.time() - start >= victim.broker_timeout * 0.9


async def test_cancellations_added_while_away_arrive_before_the_next_job(
    connect: Connect,
) -> None:
    manager, server = await connect(), await connect()
    seen: list[object] = []
    arrived: asyncio.Queue[object] = asyncio.Queue()

    async def on_command(command: Command) -> None:
        seen.append(command)
        arrived.put_nowait(command)

    async def on_job(delivery: Delivery) -> None:
        seen.append(delivery.message.job_id)
        arrived.put_nowait(delivery)

    _, snapshot = await server.consume_commands("s", on_command)
    assert snapshot == frozenset()
    await server.consume_jobs(1, on_job)
    await manager.publish_job(job(0))
    held = await asyncio.wait_for(arrived.get(), WAIT)
    assert isinstance(held, Delivery)
    server.partition()
    await wait_lost(held)
    await manager.set_cancellations({"job-0"})  # the broadcast cannot reach the server
    server.heal()
    for _ in range(2):
        await asyncio.wait_for(arrived.get(), WAIT)
    assert seen == ["job-0", CancelJob(job_id="job-0"), "job-0"]


# -- consumer timeout -----------------------------------------------------------------


async def test_consumer_timeout_loses_the_deliveries_and_the_same_process_gets_them_again(
    connect: Connect, broker: MemoryBroker
) -> None:
    manager, server = await connect(), await connect()
    current: dict[str, Delivery] = {}
    arrivals: Collector[Delivery] = collector()

    async def handler(delivery: Delivery) -> None:
        previous = current.get(delivery.message.job_id)
        # Never two live deliveries of one message: the old one is lost first.
        assert previous is None or previous.lost.is_set()
        current[delivery.message.job_id] = delivery
        await arrivals(delivery)

    await server.consume_jobs(2, handler)
    await manager.publish_job(job(0))
    await manager.publish_job(job(1))
    first = await arrivals.take(2)
    for expiry in (1, 2):
        server.expire_consumer_timeout()
        assert all(d.lost.is_set() for d in first)
        again = await arrivals.take(2)
        assert sorted((d.message.job_id, d.delivery_count) for d in again) == [
            ("job-0", expiry),
            ("job-1", expiry),
        ]
        assert broker.held("jobs") == 2
        with pytest.raises(DeliveryLost):
            await first[0].ack()
        first = again
    assert len(arrivals.items) == 6  # the handler's assertion held for every one


# -- broker restart -------------------------------------------------------------------


async def test_broker_restart_drops_every_connection_and_keeps_what_is_durable(
    connect: Connect, broker: MemoryBroker
) -> None:
    manager, one, two = await connect(), await connect(), await connect()
    to_one, to_two = collector(), collector()
    await one.consume_jobs(1, to_one)
    await two.consume_jobs(1, to_two)
    await manager.publish_job(job(0))
    await manager.publish_job(job(1))
    held = [await to_one.next(), await to_two.next()]
    await manager.set_cancellations({"job-9"})
    await one.publish_event(started(1))  # nobody consumes events yet: it waits

    broker.broker_restart(downtime=0.2)
    assert all(d.lost.is_set() for d in held)
    assert not broker.is_up
    with pytest.raises(BackendUnavailable):
        await manager.publish_job(job(2))

    for transport in (manager, one, two):
        await asyncio.wait_for(transport.wait_connected(), WAIT)
    back = [await to_one.next(), await to_two.next()]
    assert sorted((d.message.job_id, d.delivery_count) for d in back) == [
        ("job-0", 1),
        ("job-1", 1),
    ]
    events: Collector[Event] = collector()
    await manager.consume_events(events)
    assert await events.next() == started(1)
    _, snapshot = await two.consume_commands("late", collector())
    assert snapshot == frozenset({"job-9"})


# -- malformed messages ---------------------------------------------------------------

_FOREIGN = {
    "jobs": encode(CancelJob(job_id="x")),
    "events": encode(job(1)),
    "commands/s": encode(started(1)),
}
_PAYLOADS = {
    "not-json": (b"\x00\x01garbage", "not JSON"),
    "newer-version": (b'{"v": 2, "type": "job", "job_id": "x"}', "newer"),
    "unknown-type": (b'{"v": 1, "type": "mystery"}', "unknown message type"),
    "missing-field": (b'{"v": 1, "type": "cancel"}', "missing field"),
}


@pytest.mark.parametrize("queue", ["jobs", "events", "commands/s"])
@pytest.mark.parametrize("bad", [*_PAYLOADS, "foreign"])
async def test_malformed_messages_are_dead_lettered_with_one_warning_and_consumers_go_on(
    connect: Connect,
    broker: MemoryBroker,
    caplog: pytest.LogCaptureFixture,
    queue: str,
    bad: str,
) -> None:
    payload, reason = (_FOREIGN[queue], "expected a") if bad == "foreign" else _PAYLOADS[bad]
    manager, server = await connect(), await connect()
    jobs: Collector[Delivery] = collector()
    events: Collector[Event] = collector()
    commands: Collector[Command] = collector()
    await manager.consume_events(events)
    await server.consume_commands("s", commands)
    await server.consume_jobs(1, jobs)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="orchestratr.memory"):
        broker.inject_raw(queue, payload)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert reason in warnings[0].getMessage()
    [dead] = broker.dead_letters
    assert dead == DeadLetter(queue=queue, payload=payload, reason=dead.reason)
    assert reason in dead.reason

    # Every consumer keeps running (and the bad job holds no capacity).
    await manager.publish_job(job(5))
    await server.publish_event(started(5))
    await manager.send_command(ReleaseJobs(count=1), "s")
    assert (await jobs.next()).message == job(5)
    assert await events.next() == started(5)
    assert await commands.next() == ReleaseJobs(count=1)
    assert broker.depth("jobs") == broker.depth("events") == 0


def test_inject_raw_names_the_queues_it_knows(broker: MemoryBroker) -> None:
    with pytest.raises(ValueError, match="unknown queue"):
        broker.inject_raw("nowhere", b"{}")


async def test_subscriptions_and_the_transport_may_be_closed_from_inside_a_handler(
    connect: Connect,
) -> None:
    server, manager = await connect(), await connect()
    closed = asyncio.Event()
    subscription_box: list[Any] = []

    async def close_itself(event: Event) -> None:
        await subscription_box[0].close()
        await manager.close()
        closed.set()

    subscription_box.append(await manager.consume_events(close_itself))
    await server.publish_event(started(1))
    await asyncio.wait_for(closed.wait(), WAIT)
    with pytest.raises(PermanentBackendError):
        await manager.publish_event(started(2))
    await asyncio.wait_for(subscription_box[0].task, WAIT)  # its loop ended, nothing leaks


async def test_the_dead_letters_are_bounded_and_the_oldest_go_first(broker_name: str) -> None:
    assert MemoryBroker.get(f"{broker_name}-default").dead_letters.maxlen == DEAD_LETTER_LIMIT
    broker = MemoryBroker.get(broker_name, dead_letter_limit=3)
    transport = MemoryTransport(f"memory://{broker_name}")
    await transport.connect()
    try:
        events: Collector[Event] = collector()
        await transport.consume_events(events)
        for n in range(5):
            broker.inject_raw("events", b"not json %d" % n)
        await transport.publish_event(started(1))
        assert await events.next() == started(1)
        assert [d.payload for d in broker.dead_letters] == [b"not json %d" % n for n in (2, 3, 4)]
    finally:
        await transport.close()
        MemoryBroker.reset(broker_name)
        MemoryBroker.reset(f"{broker_name}-default")
