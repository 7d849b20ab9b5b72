"""Transport conformance, jobs: delivery, capacity, release, loss."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from orchestratr_core.errors import DeliveryLost
from orchestratr_core.testing.transport_suite._common import Collector, SuiteSettings, _job
from orchestratr_core.transport import Delivery, Transport

__all__ = ["JobTests"]


class JobTests(SuiteSettings):
    """Jobs: delivery, capacity, release, loss."""

    @pytest.mark.conformance
    async def test_published_job_is_delivered_intact_on_its_first_delivery(
        self, connect: Callable[[], Awaitable[Transport]], tag: str
    ) -> None:
        manager, server = await connect(), await connect()
        deliveries: Collector[Delivery] = Collector(self.delivery_timeout)
        await server.consume_jobs(1, deliveries)
        sent = [_job(tag, 1), _job(tag, 2)]
        for message in sent:
            await manager.publish_job(message)
        first = await deliveries.next()
        assert first.message == sent[0]
        assert first.delivery_count == 0
        assert not first.lost.is_set()
        await first.ack()
        second = await deliveries.next()
        assert second.message == sent[1]
        assert second.delivery_count == 0
        await second.ack()

    @pytest.mark.conformance
    async def test_the_same_message_published_twice_is_delivered_twice(
        self, connect: Callable[[], Awaitable[Transport]], tag: str
    ) -> None:
        manager, server = await connect(), await connect()
        deliveries: Collector[Delivery] = Collector(self.delivery_timeout)
        await server.consume_jobs(2, deliveries)
        await manager.publish_job(_job(tag))
        await manager.publish_job(_job(tag))
        copies = await deliveries.take(2)
        assert [d.message for d in copies] == [_job(tag), _job(tag)]

    @pytest.mark.conformance
    async def test_capacity_bounds_the_deliveries_held_at_once(
        self, connect: Callable[[], Awaitable[Transport]], tag: str
    ) -> None:
        manager, server, other = await connect(), await connect(), await connect()
        for n in range(10):
            await manager.publish_job(_job(tag, n))
        deliveries: Collector[Delivery] = Collector(self.delivery_timeout)
        await server.consume_jobs(3, deliveries)
        held = await deliveries.take(3)
        await deliveries.quiet(self.settle_time)
        await held[0].ack()
        await deliveries.next()
        await deliveries.quiet(self.settle_time)
        # The other six are still in the queue: a second consumer gets exactly them.
        rest: Collector[Delivery] = Collector(self.delivery_timeout)
        await other.consume_jobs(10, rest)
        await rest.take(6)
        received = {d.message.job_id for d in deliveries.items + rest.items}
        assert received == {f"{tag}-{n}" for n in range(10)}
        await rest.quiet(self.settle_time)
        assert len(deliveries.items) == 4

    @pytest.mark.conformance
    async def test_capacity_zero_pauses_without_revoking_held_deliveries(
        self, connect: Callable[[], Awaitable[Transport]], tag: str
    ) -> None:
        manager, server = await connect(), await connect()
        deliveries: Collector[Delivery] = Collector(self.delivery_timeout)
        consumer = await server.consume_jobs(2, deliveries)
        await manager.publish_job(_job(tag, 0))
        held = await deliveries.next()
        await consumer.set_capacity(0)
        await manager.publish_job(_job(tag, 1))
        await manager.publish_job(_job(tag, 2))
        await deliveries.quiet(self.settle_time)
        assert not held.lost.is_set()
        await held.ack()
        await deliveries.quiet(self.settle_time)
        await consumer.set_capacity(2)
        resumed = await deliveries.take(2)
        assert {d.message.job_id for d in resumed} == {f"{tag}-1", f"{tag}-2"}

    @pytest.mark.conformance
    async def test_a_consumer_started_with_capacity_zero_receives_nothing_until_raised(
        self, connect: Callable[[], Awaitable[Transport]], tag: str
    ) -> None:
        manager, server = await connect(), await connect()
        deliveries: Collector[Delivery] = Collector(self.delivery_timeout)
        consumer = await server.consume_jobs(0, deliveries)
        await manager.publish_job(_job(tag))
        await deliveries.quiet(self.settle_time)
        await consumer.set_capacity(1)
        assert (await deliveries.next()).message == _job(tag)

    @pytest.mark.conformance
    async def test_released_job_goes_to_another_consumer_with_a_larger_delivery_count(
        self, connect: Callable[[], Awaitable[Transport]], tag: str
    ) -> None:
        manager, first, second = await connect(), await connect(), await connect()
        mine: Collector[Delivery] = Collector(self.delivery_timeout)
        consumer = await first.consume_jobs(1, mine)
        await manager.publish_job(_job(tag))
        held = await mine.next()
        theirs: Collector[Delivery] = Collector(self.delivery_timeout)
        await second.consume_jobs(1, theirs)
        await consumer.set_capacity(0)
        await held.release()
        again = await theirs.next()
        assert again.message == held.message
        assert again.delivery_count > held.delivery_count
        await mine.quiet(self.settle_time)

    @pytest.mark.conformance
    async def test_a_held_job_is_never_delivered_to_a_second_consumer(
        self, connect: Callable[[], Awaitable[Transport]], tag: str
    ) -> None:
        manager, first, second = await connect(), await connect(), await connect()
        mine: Collector[Delivery] = Collector(self.delivery_timeout)
        consumer = await first.consume_jobs(1, mine)
        await manager.publish_job(_job(tag, 0))
        held = await mine.next()
        theirs: Collector[Delivery] = Collector(self.delivery_timeout)
        await second.consume_jobs(5, theirs)
        await manager.publish_job(_job(tag, 1))
        assert (await theirs.next()).message == _job(tag, 1)
        await theirs.quiet(self.settle_time)
        # Cancelling the consumer keeps what it holds held and valid.
        await consumer.close()
        await theirs.quiet(self.settle_time)
        assert not held.lost.is_set()
        await held.ack()
        await manager.publish_job(_job(tag, 2))
        assert (await theirs.next()).message == _job(tag, 2)
        await theirs.quiet(self.settle_time)
        await mine.quiet(self.settle_time)

    @pytest.mark.conformance
    async def test_closing_a_server_transport_marks_its_deliveries_lost_and_requeues_them(
        self, connect: Callable[[], Awaitable[Transport]], tag: str
    ) -> None:
        manager, leaving, staying = await connect(), await connect(), await connect()
        mine: Collector[Delivery] = Collector(self.delivery_timeout)
        await leaving.consume_jobs(2, mine)
        await manager.publish_job(_job(tag, 0))
        await manager.publish_job(_job(tag, 1))
        held = await mine.take(2)
        theirs: Collector[Delivery] = Collector(self.delivery_timeout)
        await staying.consume_jobs(5, theirs)
        await leaving.close()
        assert all(d.lost.is_set() for d in held)
        taken_over = await theirs.take(2)
        before = {d.message.job_id: d.delivery_count for d in held}
        for delivery in taken_over:
            assert delivery.delivery_count > before[delivery.message.job_id]
        assert {d.message.job_id for d in taken_over} == set(before)
        for delivery in held:
            with pytest.raises(DeliveryLost):
                await delivery.ack()
            with pytest.raises(DeliveryLost):
                await delivery.release()
        await leaving.close()  # idempotent

    @pytest.mark.conformance
    async def test_an_acked_job_is_gone_for_good(
        self, connect: Callable[[], Awaitable[Transport]], tag: str
    ) -> None:
        manager, first, second = await connect(), await connect(), await connect()
        mine: Collector[Delivery] = Collector(self.delivery_timeout)
        await first.consume_jobs(1, mine)
        await manager.publish_job(_job(tag, 0))
        await (await mine.next()).ack()
        await first.close()
        theirs: Collector[Delivery] = Collector(self.delivery_timeout)
        await second.consume_jobs(5, theirs)
        await manager.publish_job(_job(tag, 1))
        assert (await theirs.next()).message == _job(tag, 1)
        await theirs.quiet(self.settle_time)
