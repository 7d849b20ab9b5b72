"""Transport conformance, pools: jobs of a kind and placement constraints are
delivered only through their own pool's consumer, and servers hear of pools."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import pytest

from orchestratr_core.placement import DEFAULT_POOL, Pool
from orchestratr_core.protocol import JobMessage
from orchestratr_core.testing.transport_suite._common import Collector, SuiteSettings, _job
from orchestratr_core.transport import Delivery, Transport

__all__ = ["PoolTests"]


def _in_pool(tag: str, number: int, pool: Pool) -> JobMessage:
    return dataclasses.replace(_job(tag, number), kind=pool.kind, constraints=pool.constraints)


class PoolTests(SuiteSettings):
    """Pools (kind and constraints): routing, registration, capacity, loss."""

    @pytest.mark.conformance
    async def test_each_job_is_delivered_only_through_the_consumer_of_its_pool(
        self, connect: Callable[[], Awaitable[Transport]], tag: str
    ) -> None:
        manager, server = await connect(), await connect()
        feed = Pool.of(f"feed{tag}")
        feed_eu = Pool.of(f"feed{tag}", ["region=eu"])
        socket = Pool.of(f"socket{tag}")
        jobs: dict[Pool, list[JobMessage]] = {
            DEFAULT_POOL: [_job(tag, 0)],
            feed: [_in_pool(tag, 1, feed), _in_pool(tag, 2, feed)],
            feed_eu: [_in_pool(tag, 3, feed_eu)],
            socket: [_in_pool(tag, 4, socket)],
        }
        for messages in jobs.values():
            for message in messages:
                await manager.publish_job(message)
        collectors: dict[Pool, Collector[Delivery]] = {}
        for pool in jobs:
            collectors[pool] = Collector(self.delivery_timeout)
            await server.consume_pool(pool, 10, collectors[pool])
        for pool, messages in jobs.items():
            got = await collectors[pool].take(len(messages))
            assert sorted(d.message.job_id for d in got) == sorted(m.job_id for m in messages)
            assert all(d.message.pool == pool for d in got)
        for collector in collectors.values():
            await collector.quiet(self.settle_time)

    @pytest.mark.conformance
    async def test_a_watcher_hears_of_registered_pools_and_of_new_ones_at_once(
        self, connect: Callable[[], Awaitable[Transport]], tag: str
    ) -> None:
        manager, server = await connect(), await connect()
        early = Pool.of(f"early{tag}", ["nic=40g"])
        await manager.publish_job(_in_pool(tag, 1, early))
        heard: Collector[Pool] = Collector(self.delivery_timeout)
        watch = await server.watch_pools(heard)
        seen: set[Pool] = set()
        while not {DEFAULT_POOL, early} <= seen:
            seen.add(await heard.next())
        late = Pool.of(f"late{tag}")
        await manager.publish_job(_in_pool(tag, 2, late))
        while late not in seen:
            seen.add(await heard.next())
        # The late pool's queue existed before the watcher heard of it: its job is there.
        deliveries: Collector[Delivery] = Collector(self.delivery_timeout)
        await server.consume_pool(late, 1, deliveries)
        assert (await deliveries.next()).message.job_id == f"{tag}-2"
        await watch.close()

    @pytest.mark.conformance
    async def test_a_pool_consumer_keeps_capacity_release_and_loss_semantics(
        self, connect: Callable[[], Awaitable[Transport]], tag: str
    ) -> None:
        manager, server, other = await connect(), await connect(), await connect()
        pool = Pool.of(f"k{tag}", ["zone=b"])
        for n in range(3):
            await manager.publish_job(_in_pool(tag, n, pool))
        deliveries: Collector[Delivery] = Collector(self.delivery_timeout)
        consumer = await server.consume_pool(pool, 2, deliveries)
        held = await deliveries.take(2)
        await deliveries.quiet(self.settle_time)
        await consumer.set_capacity(0)
        extra: Collector[Delivery] = Collector(self.delivery_timeout)
        await other.consume_pool(pool, 1, extra)  # takes the third, and no more
        third = await extra.next()
        assert third.message.job_id not in {d.message.job_id for d in held}
        await consumer.set_capacity(2)
        await deliveries.quiet(self.settle_time)
        await held[0].release()
        again = await deliveries.next()
        assert again.message.job_id == held[0].message.job_id
        assert again.delivery_count > held[0].delivery_count
        rest: Collector[Delivery] = Collector(self.delivery_timeout)
        await (await connect()).consume_pool(pool, 5, rest)
        await server.close()
        assert held[1].lost.is_set() and again.lost.is_set()
        got = await rest.take(2)
        assert {d.message.job_id for d in got} == {d.message.job_id for d in held}
