"""Self-fencing: a server that stops hearing from the broker gives its jobs up before
the broker can hand them to anyone else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from orchestratr_core.protocol import JobMessage
from orchestratr_core.testing.proxy import SilentProxy
from orchestratr_core.transport import Delivery
from orchestratr_rabbitmq import RabbitMQTransport

pytestmark = pytest.mark.rabbitmq

MakeTransport = Callable[..., RabbitMQTransport]


@pytest.fixture
async def proxy() -> AsyncIterator[SilentProxy]:
    proxy = SilentProxy()
    await proxy.start()
    yield proxy
    await proxy.stop()


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
