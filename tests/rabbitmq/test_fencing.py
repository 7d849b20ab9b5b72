"""Self-fencing: a server that stops hearing from the broker gives its jobs up before
the broker can hand them to anyone else."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable

import pytest

from orchestratr_core import protocol as p
from orchestratr_core.errors import OrchestratrError, PublishError
from orchestratr_core.protocol import JobMessage
from orchestratr_core.testing.proxy import SilentProxy
from orchestratr_core.transport import Delivery
from orchestratr_rabbitmq import RabbitMQTransport
from tests.support.rabbitmq import eventually

pytestmark = pytest.mark.rabbitmq

MakeTransport = Callable[..., RabbitMQTransport]


async def test_a_silent_partition_marks_jobs_lost_before_the_broker_gives_them_away(
    make_transport: MakeTransport, proxy: SilentProxy
) -> None:
    heartbeat = 2  # the broker drops us 4-6 s after the last byte it got from us
    partitioned = make_transport(
        proxy.url, heartbeat=heartbeat, connect_timeout=1.0, reconnect_delay=0.2
    )
    manager, survivor = make_transport(), make_transport()
    for transport in (partitioned, manager, survivor):
        await transport.connect()
    loop = asyncio.get_running_loop()

    mine: asyncio.Queue[Delivery] = asyncio.Queue()
    await partitioned.consume_jobs(1, mine.put)
    job = JobMessage(job_id="j", name="n", argument="", generation=1, created_at=0.0)
    await manager.publish_job(job)
    held = await asyncio.wait_for(mine.get(), 10)

    taken_over: asyncio.Future[tuple[float, Delivery]] = loop.create_future()

    async def take(delivery: Delivery) -> None:
        if not taken_over.done():
            taken_over.set_result((loop.time(), delivery))

    await survivor.consume_jobs(1, take)

    assert held.valid_until > time.monotonic()
    paused = loop.time()
    proxy.pause()
    await asyncio.wait_for(held.lost.wait(), 10)
    lost_at = loop.time()
    assert held.valid_until <= time.monotonic()
    assert not taken_over.done(), "the broker gave the job away before we fenced"

    taken_at, again = await asyncio.wait_for(taken_over, 20)
    assert again.message == job
    assert again.delivery_count > held.delivery_count
    fence = partitioned.settings.fence_timeout + partitioned.settings.ping_interval
    assert lost_at - paused <= fence + 0.5
    assert taken_at - paused >= 2 * heartbeat - partitioned.settings.ping_interval
    assert lost_at < taken_at


async def test_after_a_partition_longer_than_the_fence_events_flow_again_once_healed(
    make_transport: MakeTransport, proxy: SilentProxy
) -> None:
    """A publish waiting for its confirm when the fence gives the session up fails
    then (it used to hang until the dead connection was torn down and then raise
    ``CancelledError``, which ended the server's event pump: no heartbeat ever
    again); after the heal, events reach the events queue again."""
    heartbeat = 2  # fence 3 s; the broker drops the silent connection after 4-6 s
    partitioned = make_transport(proxy.url, heartbeat=heartbeat, connect_timeout=2.0)
    manager = make_transport()
    await manager.connect()
    loop = asyncio.get_running_loop()
    received: list[tuple[float, str]] = []

    async def on_event(event: p.Event) -> None:
        assert isinstance(event, p.ServerHeartbeat)
        received.append((loop.time(), event.name))

    await manager.consume_events(on_event)
    await partitioned.connect()
    failures: list[tuple[float, OrchestratrError]] = []

    async def pump() -> None:
        # As the server's event pump: a failed publish is reported and retried.
        for n in itertools.count():
            event = p.ServerHeartbeat(
                server_id="s", name=str(n), max_workers=1, started_at=0.0, sent_at=time.time()
            )
            try:
                await partitioned.publish_event(event)
            except OrchestratrError as exc:
                failures.append((loop.time(), exc))
            await asyncio.sleep(0.2)

    pumping = asyncio.create_task(pump())
    try:
        await eventually(lambda: len(received) >= 2, 10, "events before the partition")
        paused = loop.time()
        proxy.pause()
        await asyncio.sleep(3 * heartbeat + 2)  # past the fence and the broker's drop
        assert failures, "a publish during the partition neither failed nor returned"
        failed_at, error = failures[0]
        settings = partitioned.settings
        assert failed_at - paused <= settings.fence_timeout + settings.ping_interval + 0.5
        assert isinstance(error, PublishError), error
        assert not pumping.done(), pumping
        healed = loop.time()
        proxy.resume()
        bound = settings.reconnect_max_delay + 2.0  # the reconnect backoff, then a publish
        flowing = await eventually(
            lambda: any(at > healed for at, _ in received), bound, "an event after the heal"
        )
        print(f"first event {flowing - healed:.2f}s after the heal")
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping
