"""Behaviour of the RabbitMQ transport beyond the generic contract, on the real broker:
connection errors, version detection, loss of the channel or connection, reconnecting,
dead-lettering, delivery counts, the cancellation snapshot."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest

from orchestratr_core.errors import (
    BackendUnavailable,
    DeliveryLost,
    PermanentBackendError,
    PublishError,
)
from orchestratr_core.protocol import CancelJob, Event, JobMessage, JobStarted
from orchestratr_core.transport import Delivery
from orchestratr_rabbitmq import BrokerVersion, RabbitMQTransport
from tests.support.rabbitmq import BROKER_URL, close_connections, eventually, rabbitmqctl

pytestmark = pytest.mark.rabbitmq

MakeTransport = Callable[..., RabbitMQTransport]


def job(number: int = 0) -> JobMessage:
    return JobMessage(
        job_id=f"job-{number}", name=f"n{number}", argument="", generation=1, created_at=1.0
    )


class Inbox:
    """A handler that queues what it gets."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    async def __call__(self, item: Any) -> None:
        self.items.append(item)
        self.queue.put_nowait(item)

    async def next(self, within: float = 10.0) -> Any:
        return await asyncio.wait_for(self.queue.get(), within)

    async def quiet(self, seconds: float = 0.3) -> None:
        with pytest.raises(TimeoutError):
            item = await asyncio.wait_for(self.queue.get(), seconds)
            pytest.fail(f"unexpected {item!r}")


# -- connecting --------------------------------------------------------------------------


async def test_the_broker_version_is_detected_from_the_connection(
    make_transport: MakeTransport,
) -> None:
    transport = make_transport()
    await transport.connect()
    reported = BrokerVersion.parse(rabbitmqctl("version").strip())
    assert transport.version == reported
    assert transport.connected


async def test_wrong_credentials_fail_at_once_with_a_one_line_error_without_the_password() -> None:
    transport = RabbitMQTransport(
        "amqp://guest:WRONG-pa55@127.0.0.1:5672/", namespace="never", connect_attempts=3
    )
    started = time.monotonic()
    with pytest.raises(PermanentBackendError) as caught:
        await transport.connect()
    message = str(caught.value)
    assert "ACCESS_REFUSED" in message
    assert "'guest'" in message
    assert "WRONG-pa55" not in message
    assert "\n" not in message
    assert time.monotonic() - started < 5  # no retries for a permanent error


async def test_an_unknown_vhost_fails_at_once_naming_the_vhost() -> None:
    transport = RabbitMQTransport(
        "amqp://guest:guest@127.0.0.1:5672/no-such-vhost", namespace="never"
    )
    with pytest.raises(PermanentBackendError) as caught:
        await transport.connect()
    message = str(caught.value)
    assert "'no-such-vhost'" in message
    assert "guest:guest" not in message
    assert "\n" not in message


async def test_an_unreachable_broker_is_retried_with_backoff_then_reported_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = RabbitMQTransport(
        "amqp://guest:pw-xyz@127.0.0.1:1/",
        namespace="never",
        connect_attempts=3,
        reconnect_delay=0.05,
    )
    with (
        caplog.at_level(logging.WARNING, "orchestratr"),
        pytest.raises(BackendUnavailable) as caught,
    ):
        await transport.connect()
    assert "127.0.0.1:1 cannot be reached" in str(caught.value)
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2
    assert all("pw-xyz" not in r.getMessage() for r in caplog.records)


async def test_publishing_before_connect_is_a_clear_error(make_transport: MakeTransport) -> None:
    with pytest.raises(BackendUnavailable, match="connect"):
        await make_transport().publish_job(job())


async def test_a_publish_the_broker_cannot_route_raises_publish_error(
    make_transport: MakeTransport, broker: aio_pika.abc.AbstractConnection, namespace: str
) -> None:
    manager = make_transport()
    await manager.connect()
    channel = await broker.channel()
    await channel.queue_delete(f"{namespace}.jobs")
    with pytest.raises(PublishError, match="does not exist"):
        await manager.publish_job(job())


# -- delivery counts and loss --------------------------------------------------------------


async def test_delivery_count_grows_with_every_redelivery(make_transport: MakeTransport) -> None:
    manager, server = make_transport(), make_transport()
    await manager.connect()
    await server.connect()
    inbox = Inbox()
    await server.consume_jobs(1, inbox)
    await manager.publish_job(job())
    counts = []
    for _ in range(4):
        delivery: Delivery = await inbox.next()
        counts.append(delivery.delivery_count)
        await delivery.release()
    assert counts == [0, 1, 2, 3]


async def test_a_channel_closed_by_the_broker_marks_its_deliveries_lost_then_they_come_back(
    make_transport: MakeTransport,
) -> None:
    manager, server = make_transport(), make_transport(reconnect_delay=0.05)
    await manager.connect()
    await server.connect()
    inbox = Inbox()
    consumer = await server.consume_jobs(2, inbox)
    await manager.publish_job(job(0))
    await manager.publish_job(job(1))
    held = [await inbox.next(), await inbox.next()]
    # Make the broker close the jobs channel: ack a delivery tag it never sent.
    jobs_channel = await consumer.channel.get_underlay_channel()  # type: ignore[attr-defined]
    await jobs_channel.basic_ack(999_999)
    await eventually(lambda: all(d.lost.is_set() for d in held), 5, "deliveries marked lost")
    again = [await inbox.next(), await inbox.next()]
    assert {d.message.job_id for d in again} == {"job-0", "job-1"}
    assert all(d.delivery_count == 1 for d in again)
    assert all(not d.lost.is_set() for d in again)
    with pytest.raises(DeliveryLost):
        await held[0].ack()
    await again[0].ack()
    await inbox.quiet()


async def test_a_connection_closed_by_the_broker_loses_jobs_and_every_subscription_returns(
    make_transport: MakeTransport,
) -> None:
    name = f"victim-{uuid.uuid4().hex[:8]}"
    manager = make_transport()
    server = make_transport(connection_name=name, reconnect_delay=0.05)
    await manager.connect()
    await server.connect()
    commands, events, jobs = Inbox(), Inbox(), Inbox()
    order: list[str] = []

    async def on_command(command: Any) -> None:
        order.append(f"command {command.job_id}")
        await commands(command)

    async def on_job(delivery: Delivery) -> None:
        order.append(f"job {delivery.message.job_id}")
        await jobs(delivery)

    _, snapshot = await server.consume_commands("victim", on_command)
    assert snapshot == frozenset()
    await server.consume_events(events)
    await server.consume_jobs(1, on_job)
    await manager.publish_job(job(0))
    held: Delivery = await jobs.next()

    assert close_connections(name) == 1
    await eventually(held.lost.is_set, 5, "the delivery marked lost")
    # While the server was away a job was cancelled; the broadcast found no queue.
    await manager.set_cancellations({"gone-1"})

    redelivered: Delivery = await jobs.next()
    assert redelivered.message == held.message
    assert redelivered.delivery_count > held.delivery_count
    assert await commands.next() == CancelJob(job_id="gone-1")
    # The id cancelled while away reached the handler before the job came back.
    assert order == ["job job-0", "command gone-1", "job job-0"]
    await manager.set_cancellations({"gone-1", "gone-2"})
    assert await commands.next() == CancelJob(job_id="gone-2")
    await manager.publish_event(JobStarted(server_id="m", job_id="x", fence=1, at=0.0))
    assert isinstance(await events.next(), Event)
    await server.publish_event(JobStarted(server_id="victim", job_id="y", fence=2, at=0.0))
    assert (await events.next()).job_id == "y"


async def test_a_consumer_cancelled_by_the_broker_marks_its_deliveries_lost(
    make_transport: MakeTransport, broker: aio_pika.abc.AbstractConnection, namespace: str
) -> None:
    manager, server = make_transport(), make_transport(reconnect_delay=0.05)
    await manager.connect()
    await server.connect()
    inbox = Inbox()
    await server.consume_jobs(1, inbox)
    await manager.publish_job(job())
    held: Delivery = await inbox.next()
    channel = await broker.channel()
    await channel.queue_delete(f"{namespace}.jobs")  # the broker sends basic.cancel
    await eventually(held.lost.is_set, 5, "the delivery marked lost")
    # The server reconnects and declares the queue again; new jobs flow.
    await eventually(lambda: server.connected, 10, "the server reconnected")
    await manager.publish_job(job(1))
    assert (await inbox.next()).message == job(1)


async def test_a_known_consumer_timeout_hands_jobs_back_before_it_expires(
    make_transport: MakeTransport,
) -> None:
    manager = make_transport()
    server = make_transport(consumer_timeout=2.0)  # as if the broker's were 2 s
    await manager.connect()
    await server.connect()
    inbox = Inbox()
    await server.consume_jobs(1, inbox)
    await manager.publish_job(job())
    first: Delivery = await inbox.next()
    started = time.monotonic()
    again: Delivery = await inbox.next(within=5)
    assert first.lost.is_set()
    assert 1.4 < time.monotonic() - started < 3
    assert again.message == first.message
    assert again.delivery_count == first.delivery_count + 1


async def test_raising_capacity_counts_what_cancelled_consumers_still_hold(
    make_transport: MakeTransport,
) -> None:
    manager, server = make_transport(), make_transport()
    await manager.connect()
    await server.connect()
    for n in range(10):
        await manager.publish_job(job(n))
    inbox = Inbox()
    consumer = await server.consume_jobs(3, inbox)
    first = [await inbox.next() for _ in range(3)]
    await consumer.set_capacity(5)
    [await inbox.next() for _ in range(2)]
    await inbox.quiet()
    await first[0].ack()  # held by the first, cancelled consumer
    await inbox.next()
    await inbox.quiet()
    await consumer.set_capacity(2)  # below what is held: nothing revoked, nothing new
    await first[1].ack()
    await first[2].ack()
    await inbox.quiet()
    assert len(inbox.items) == 6
    assert not any(d.lost.is_set() for d in inbox.items)


async def test_a_large_capacity_is_granted_in_prefetch_steps(
    make_transport: MakeTransport, broker: aio_pika.abc.AbstractConnection, namespace: str
) -> None:
    # A server with room for thousands of jobs must not let the broker push them
    # all at once: the fence ping's answer would queue behind them.
    manager, server = make_transport(), make_transport(prefetch_step=10)
    await manager.connect()
    await server.connect()
    for n in range(40):
        await manager.publish_job(job(n))
    credit: list[int] = []
    inbox = Inbox()

    async def record(delivery: Delivery) -> None:
        consumers = delivery._consumer.consumers.values()  # type: ignore[attr-defined]
        credit.append(max((c.prefetch for c in consumers), default=0))
        await inbox(delivery)

    await server.consume_jobs(25, record)
    held = [await inbox.next() for _ in range(25)]
    await inbox.quiet(0.5)
    assert max(credit) == 10
    assert sorted(d.message.job_id for d in held) == sorted(f"job-{n}" for n in range(25))
    channel = await broker.channel()
    queue = await channel.declare_queue(server.topology_name("jobs"), passive=True)
    assert queue.declaration_result.message_count == 15
    await held[0].ack()  # room for one more: exactly one comes
    assert (await inbox.next()).message.job_id == "job-25"
    await inbox.quiet(0.5)
    assert not any(d.lost.is_set() for d in inbox.items)


# -- malformed messages ------------------------------------------------------------------


async def test_malformed_messages_are_dead_lettered_with_one_warning(
    make_transport: MakeTransport,
    broker: aio_pika.abc.AbstractConnection,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager, server = make_transport(), make_transport()
    await manager.connect()
    await server.connect()
    inbox = Inbox()
    await server.consume_jobs(1, inbox)
    channel = await broker.channel()
    with caplog.at_level(logging.WARNING, "orchestratr"):
        for body in (b"garbage", b'{"v": 2, "type": "job"}'):
            await channel.default_exchange.publish(aio_pika.Message(body), f"{namespace}.jobs")
        await manager.publish_job(job())
        assert (await inbox.next()).message == job()
    dead = await channel.declare_queue(f"{namespace}.dead", passive=True)
    bodies = []
    for _ in range(2):
        message = await dead.get(timeout=5, fail=True)
        assert message is not None
        bodies.append(message.body)
        await message.ack()
    assert bodies == [b"garbage", b'{"v": 2, "type": "job"}']
    warnings = [r.getMessage() for r in caplog.records if "dead-lettering" in r.getMessage()]
    assert len(warnings) == 2
    assert "newer" in warnings[1]


# -- the cancellation snapshot -----------------------------------------------------------


async def test_a_reader_waits_for_the_held_set_instead_of_reading_an_empty_set(
    make_transport: MakeTransport, broker: aio_pika.abc.AbstractConnection, namespace: str
) -> None:
    """Another process holds the set (taken, unacknowledged: the set's lock): the
    reader waits for it rather than take the empty queue for "no set"."""
    manager, server = make_transport(), make_transport()
    await manager.connect()
    await server.connect()
    await manager.set_cancellations({"a", "b"})
    channel = await broker.channel()
    sets = await channel.declare_queue(f"{namespace}.cancellations", passive=True)
    held = await sets.get(timeout=5)  # another process is reading
    assert held is not None

    async def unlock() -> None:
        await asyncio.sleep(0.5)
        await held.reject(requeue=True)

    unlocking = asyncio.create_task(unlock())
    started = time.monotonic()
    _, ids = await server.consume_commands("s", Inbox())
    await unlocking
    assert ids == frozenset({"a", "b"})
    assert time.monotonic() - started >= 0.4


async def test_a_writer_waits_for_the_held_set_instead_of_storing_a_second_one(
    make_transport: MakeTransport, broker: aio_pika.abc.AbstractConnection, namespace: str
) -> None:
    """The set's lock is the set: while another process holds it, a writer waits,
    then replaces it; the queue holds one set, the newest, and the broadcast went
    out for the id the held set lacked."""
    manager, server = make_transport(), make_transport()
    await manager.connect()
    await server.connect()
    await manager.set_cancellations({"a"})
    inbox = Inbox()
    await server.consume_commands("s", inbox)
    channel = await broker.channel()
    sets = await channel.declare_queue(f"{namespace}.cancellations", passive=True)
    held = await sets.get(timeout=5)
    assert held is not None
    writing = asyncio.create_task(manager.set_cancellations({"a", "b"}))
    await asyncio.sleep(0.5)
    assert not writing.done(), "the writer wrote beside a held set"
    await held.reject(requeue=True)
    await asyncio.wait_for(writing, 10)
    assert await inbox.next() == CancelJob(job_id="b")
    again = await channel.declare_queue(f"{namespace}.cancellations", passive=True)
    assert again.declaration_result.message_count == 1
    _, ids = await make_and_subscribe(make_transport)
    assert ids == frozenset({"a", "b"})


async def test_a_set_lost_by_hand_is_written_again_not_waited_for_forever(
    make_transport: MakeTransport,
    broker: aio_pika.abc.AbstractConnection,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Purged by an operator: the marker says a set was written, and none comes
    back. A writer waits most of ``snapshot_timeout``, then stores the set again."""
    manager = make_transport(snapshot_timeout=2.0)
    await manager.connect()
    await manager.set_cancellations({"a"})
    channel = await broker.channel()
    sets = await channel.declare_queue(f"{namespace}.cancellations", passive=True)
    await sets.purge()
    started = time.monotonic()
    await manager.set_cancellations({"a", "b"})
    assert 1.4 <= time.monotonic() - started < 4.0
    assert any("missing" in r.getMessage() for r in caplog.records)
    _, ids = await make_and_subscribe(make_transport)
    assert ids == frozenset({"a", "b"})


async def test_concurrent_readers_always_see_a_complete_recent_set_and_writes_never_vanish(
    make_transport: MakeTransport, broker: aio_pika.abc.AbstractConnection, namespace: str
) -> None:
    writers = [make_transport() for _ in range(2)]
    readers = [make_transport() for _ in range(4)]
    for transport in writers + readers:
        await transport.connect()
    await writers[0].set_cancellations({"w0"})
    for round_ in range(1, 8):
        before = frozenset({f"w{round_ - 1}"})
        after = frozenset({f"w{round_}"})
        results = await asyncio.gather(
            writers[round_ % 2].set_cancellations(after),
            *(
                reader.consume_commands(f"r{n}-{round_}", Inbox())
                for n, reader in enumerate(readers)
            ),
        )
        for _, ids in results[1:]:  # type: ignore[misc]
            assert ids in (before, after)
    _, final = await readers[0].consume_commands("last", Inbox())
    assert final == frozenset({"w7"})
    # A reader hands the set back without waiting for the broker to requeue it
    # (docs/rabbitmq.md, "Cancellation set"): on RabbitMQ 4.0.5 under load a look
    # on another connection once came before it. Then it rests there, alone.
    channel = await broker.channel()
    deadline = time.monotonic() + 5.0
    while True:
        queue = await channel.declare_queue(f"{namespace}.cancellations", passive=True)
        count = queue.declaration_result.message_count or 0
        assert count <= 1, f"{count} sets in the queue"
        if count == 1 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert count == 1, "the set vanished"


async def test_a_snapshot_queue_from_an_older_version_is_rebuilt_keeping_the_set(
    make_transport: MakeTransport, broker: aio_pika.abc.AbstractConnection, namespace: str
) -> None:
    channel = await broker.channel()
    old_arguments = {"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "drop-head"}
    await channel.declare_queue(f"{namespace}.cancellations", durable=True, arguments=old_arguments)
    old_set = b'{"v":1,"type":"cancellations","written":5,"job_ids":["kept"]}'
    await channel.default_exchange.publish(aio_pika.Message(old_set), f"{namespace}.cancellations")
    server = make_transport()
    await server.connect()
    _, ids = await server.consume_commands("s", Inbox())
    assert ids == frozenset({"kept"})
    assert server.topology is not None
    arguments = server.topology.cancellations_arguments()
    assert arguments["x-dead-letter-exchange"] == f"{namespace}.dlx"
    check = await broker.channel()
    await check.declare_queue(  # the current arguments are now equivalent
        f"{namespace}.cancellations", durable=True, arguments=arguments
    )


async def test_losing_the_publishing_connection_restarts_the_session_and_publishing_resumes(
    make_transport: MakeTransport,
) -> None:
    name = f"pub-{uuid.uuid4().hex[:8]}"
    manager = make_transport()
    server = make_transport(connection_name=name, reconnect_delay=0.05)
    await manager.connect()
    await server.connect()
    jobs = Inbox()
    await server.consume_jobs(1, jobs)
    await manager.publish_job(job(0))
    held: Delivery = await jobs.next()
    assert close_connections(f"{name} (publish)") == 1
    await eventually(held.lost.is_set, 5, "the delivery marked lost")
    assert (await jobs.next()).delivery_count == held.delivery_count + 1
    await server.publish_event(JobStarted(server_id="s", job_id="j", fence=1, at=0.0))


async def test_settling_a_delivery_twice_is_a_programming_error(
    make_transport: MakeTransport,
) -> None:
    manager, server = make_transport(), make_transport()
    await manager.connect()
    await server.connect()
    inbox = Inbox()
    await server.consume_jobs(1, inbox)
    await manager.publish_job(job())
    delivery: Delivery = await inbox.next()
    await delivery.ack()
    with pytest.raises(RuntimeError, match="already settled"):
        await delivery.release()


async def test_a_frozen_process_finds_its_lease_expired_before_its_next_step(
    make_transport: MakeTransport,
) -> None:
    manager = make_transport()
    server = make_transport(heartbeat=2, fence_timeout=1.5, reconnect_delay=0.05)
    await manager.connect()
    await server.connect()
    inbox = Inbox()
    await server.consume_jobs(1, inbox)
    await manager.publish_job(job())
    held: Delivery = await inbox.next()
    now = time.monotonic()
    assert now < held.valid_until <= now + server.settings.fence_timeout
    time.sleep(2.0)  # noqa: ASYNC251 - the whole process freezes, as under SIGSTOP
    assert time.monotonic() > held.valid_until  # checked before any callback ran
    await eventually(held.lost.is_set, 2, "the fence to mark the delivery lost")
    assert held.valid_until <= time.monotonic()
    again: Delivery = await inbox.next()
    assert again.delivery_count == held.delivery_count + 1
    assert again.valid_until > time.monotonic()


async def test_a_reader_that_dies_holding_the_set_does_not_make_it_look_empty(
    make_transport: MakeTransport, namespace: str
) -> None:
    manager, server = make_transport(), make_transport()
    await manager.connect()
    await server.connect()
    await manager.set_cancellations({"x", "y"})
    dying = await aio_pika.connect(BROKER_URL)
    channel = await dying.channel()
    sets = await channel.declare_queue(f"{namespace}.cancellations", passive=True)
    assert await sets.get(timeout=5) is not None  # held, mid-read

    async def die() -> None:
        await asyncio.sleep(0.3)
        await dying.close()  # the message is given back by the broker, asynchronously

    dying_task = asyncio.create_task(die())
    for n in range(3):
        _, ids = (
            await make_and_subscribe(make_transport)
            if n
            else await server.consume_commands("s", Inbox())
        )
        assert ids == frozenset({"x", "y"})
    await dying_task


async def make_and_subscribe(make_transport: MakeTransport) -> tuple[Any, frozenset[str]]:
    transport = make_transport()
    await transport.connect()
    return await transport.consume_commands(f"s-{uuid.uuid4().hex[:6]}", Inbox())


async def test_a_reconnect_is_counted_in_the_metrics(make_transport: MakeTransport) -> None:
    from orchestratr_core import metrics
    from tests.support.web import exposition, value

    metrics.install()
    name, label = "orchestratr_broker_reconnects_total", 'transport="rabbitmq"'
    before = value(exposition(), name, label)
    connection = f"metrics-{time.monotonic_ns()}"
    transport = make_transport(connection_name=connection, reconnect_delay=0.05)
    await transport.connect()
    assert close_connections(connection) > 0
    await eventually(lambda: value(exposition(), name, label) >= before + 1, 10, "counted")
