"""How the survivors of a dead server share its jobs, on the real broker. When the
dead server's connection closes, the broker hands its returned messages at once to
the consumers that have unused credit, one each in turn; what is left waits for the
next consumer with credit, and goes to whichever survivor's step up arrives first.
So a survivor's share follows the credit it had unused at that moment: a jobs
consumer tops its credit up to the full ``prefetch_step`` once a burst has ended."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest

from orchestratr_core.protocol import JobMessage
from orchestratr_core.transport import Delivery, JobConsumer
from orchestratr_rabbitmq import RabbitMQTransport
from orchestratr_rabbitmq.transport.consumers import BURST_ENDED
from tests.support.rabbitmq import BROKER_URL

pytestmark = pytest.mark.rabbitmq

MakeTransport = Callable[..., RabbitMQTransport]


def job(number: int) -> JobMessage:
    return JobMessage(
        job_id=f"job-{number}", name=f"n{number}", argument="", generation=1, created_at=1.0
    )


class Holder:
    """A handler that holds what it gets, as a server holds a running job."""

    def __init__(self) -> None:
        self.held: list[Delivery] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.held.append(delivery)


async def until(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within}s: {what}")
        await asyncio.sleep(0.01)


def free(consumer: JobConsumer) -> int:
    """Deliveries the broker may still push to ``consumer`` (its unused credit)."""
    return int(consumer._free())  # type: ignore[attr-defined]


def live_consumers(consumer: JobConsumer) -> int:
    return len(consumer.consumers)  # type: ignore[attr-defined]


def budget(consumer: JobConsumer) -> int:
    return int(consumer._budget())  # type: ignore[attr-defined]


async def test_survivors_of_equal_capacity_take_near_equal_shares_of_a_dead_servers_jobs(
    make_transport: MakeTransport,
) -> None:
    # The failover benchmark's shape, a fifth of its size: four servers of equal
    # capacity (three steps), each holding two steps' worth of jobs, one dies.
    step, own, capacity, dead = 100, 200, 300, 200
    manager = make_transport()
    await manager.connect()
    # The server that dies takes its jobs first (a plain consumer holding them).
    victim = await aio_pika.connect(BROKER_URL)
    try:
        channel = await victim.channel()
        await channel.set_qos(prefetch_count=dead)
        queue = await channel.get_queue(manager.topology_name("jobs"), ensure=False)
        taken: list[Any] = []

        async def hold(message: Any) -> None:
            taken.append(message)

        await queue.consume(hold)
        await asyncio.gather(*(manager.publish_job(job(n)) for n in range(dead)))
        await until(lambda: len(taken) == dead, 30, "the victim holds its jobs")
        # The survivors take theirs in one burst together; a few more than `own`
        # reach some of them, and those jobs end (rebalanced away): equal holdings.
        holders = [Holder() for _ in range(3)]
        consumers = []
        for holder in holders:
            survivor = make_transport(prefetch_step=step)
            await survivor.connect()
            consumers.append(await survivor.consume_jobs(capacity, holder))
        extra = 3 * own + 6
        await asyncio.gather(*(manager.publish_job(job(dead + n)) for n in range(extra)))
        await until(lambda: sum(len(h.held) for h in holders) == extra, 30, "the burst taken")
        for holder in holders:
            while len(holder.held) > own:
                await holder.held.pop().ack()
        await asyncio.sleep(5 * BURST_ENDED)  # the burst has ended
        for consumer in consumers:
            # Never more than a step ahead of what is held (the fence ping's bound),
            # never more than the capacity.
            assert free(consumer) <= step
            assert budget(consumer) <= capacity
        before = [len(h.held) for h in holders]
        assert before == [own] * 3
        await victim.close()
    finally:
        if not victim.is_closed:
            await victim.close()
    await until(lambda: sum(len(h.held) for h in holders) == 3 * own + dead, 30, "taken over")
    await asyncio.sleep(3 * BURST_ENDED)  # nothing more arrives
    shares = [len(h.held) - b for h, b in zip(holders, before, strict=True)]
    assert sum(shares) == dead
    # Even within a tenth of a share: 66-68 each. Without the top-up 92/54/54,
    # 53/54/93, 77/48/75: a burst left some survivors with 53-56 unused and others
    # with 100, and what did not fit went to whichever stepped up first.
    assert max(shares) - min(shares) <= dead // 30, shares
    assert all(len(h.held) <= capacity for h in holders)
    assert not any(d.lost.is_set() for h in holders for d in h.held)


async def after_a_burst(
    make_transport: MakeTransport, step: int, capacity: int, jobs: int
) -> tuple[RabbitMQTransport, JobConsumer, Holder]:
    """A server of ``capacity`` that took ``jobs`` jobs in one burst."""
    manager, server = make_transport(), make_transport(prefetch_step=step)
    await manager.connect()
    await server.connect()
    holder = Holder()
    consumer = await server.consume_jobs(capacity, holder)
    await asyncio.gather(*(manager.publish_job(job(n)) for n in range(jobs)))
    await until(lambda: len(holder.held) == jobs, 20, "the burst taken")
    return manager, consumer, holder


async def test_once_a_burst_has_ended_the_unused_credit_is_topped_up_to_a_full_step(
    make_transport: MakeTransport,
) -> None:
    step = 40
    manager, consumer, holder = await after_a_burst(make_transport, step, 1000, 30)
    # 30 of a step of 40 used: the burst's own step up left free credit between
    # half a step and a step; once the burst has ended it is a full step again.
    await until(lambda: free(consumer) == step, 5, "credit topped up")
    consumers = live_consumers(consumer)
    # A few more deliveries (under an eighth of a step) add no consumer each...
    await manager.publish_job(job(30))
    await until(lambda: len(holder.held) == 31, 10, "one more")
    await asyncio.sleep(5 * BURST_ENDED)
    assert (free(consumer), live_consumers(consumer)) == (step - 1, consumers)
    # ...an eighth of a step does, once they stop coming.
    await asyncio.gather(*(manager.publish_job(job(31 + n)) for n in range(4)))
    await until(lambda: len(holder.held) == 35, 10, "five more")
    await until(lambda: free(consumer) == step, 5, "credit topped up again")
    assert live_consumers(consumer) == consumers + 1
    assert not any(d.lost.is_set() for d in holder.held)


async def test_the_top_up_never_grants_credit_beyond_the_capacity(
    make_transport: MakeTransport,
) -> None:
    manager, consumer, holder = await after_a_burst(make_transport, 40, 45, 30)
    await asyncio.sleep(5 * BURST_ENDED)
    # The step up within the burst granted the last 5 of the capacity: 15 unused,
    # and no room for the rest of a step.
    assert (budget(consumer), free(consumer)) == (45, 15)
    await asyncio.gather(*(manager.publish_job(job(30 + n)) for n in range(20)))
    await until(lambda: len(holder.held) == 45, 10, "up to the capacity")
    await asyncio.sleep(5 * BURST_ENDED)
    assert (budget(consumer), free(consumer), len(holder.held)) == (45, 0, 45)
    assert not any(d.lost.is_set() for d in holder.held)
