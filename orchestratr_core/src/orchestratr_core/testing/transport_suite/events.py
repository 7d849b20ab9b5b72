"""Transport conformance, events: order, keeping, one active consumer, redelivery."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from orchestratr_core.errors import DeadLetter
from orchestratr_core.protocol import Event, JobStarted, RunningJob, ServerHeartbeat
from orchestratr_core.testing.transport_suite._common import Collector, SuiteSettings, _event
from orchestratr_core.transport import Transport

__all__ = ["EventTests"]


class EventTests(SuiteSettings):
    """Events: order, keeping, one active consumer, redelivery."""

    @pytest.mark.conformance
    async def test_events_of_each_publisher_arrive_in_publish_order(
        self, connect: Callable[[], Awaitable[Transport]]
    ) -> None:
        manager, one, two = await connect(), await connect(), await connect()
        events: Collector[Event] = Collector(self.delivery_timeout)
        await manager.consume_events(events)

        async def publish(transport: Transport, server_id: str) -> None:
            for n in range(15):
                await transport.publish_event(_event(server_id, n))

        await asyncio.gather(publish(one, "one"), publish(two, "two"))
        await events.take(30)
        for server_id in ("one", "two"):
            mine = [e for e in events.items if e.server_id == server_id]
            assert mine == [_event(server_id, n) for n in range(15)]

    @pytest.mark.conformance
    async def test_events_published_before_any_manager_listens_are_kept(
        self, connect: Callable[[], Awaitable[Transport]]
    ) -> None:
        server = await connect()
        heartbeat = ServerHeartbeat(
            server_id="s",
            name="server s",
            max_workers=4,
            started_at=1.0,
            sent_at=2.0,
            host="h",
            pid=7,
            jobs=(RunningJob(job_id="j", fence=(3 << 32) | 1, last_heartbeat=1.5, restarts=2),),
        )
        await server.publish_event(heartbeat)
        await server.publish_event(_event("s", 1))
        manager = await connect()
        events: Collector[Event] = Collector(self.delivery_timeout)
        await manager.consume_events(events)
        assert await events.take(2) == [heartbeat, _event("s", 1)]

    @pytest.mark.conformance
    async def test_the_events_backlog_counts_the_events_waiting_or_says_it_cannot(
        self, connect: Callable[[], Awaitable[Transport]]
    ) -> None:
        """``events_backlog`` (what the leader judges silence by): ``None`` from a
        transport that cannot tell, else the events published and not yet applied
        -- all of them before a manager listens, none once it applied them."""
        server = await connect()
        for n in range(5):
            await server.publish_event(_event("s", n))
        manager = await connect()
        if await manager.events_backlog() is None:
            return  # this transport cannot tell: the leader uses the wall clock
        await _eventually_backlog(manager, 5, self.delivery_timeout)
        events: Collector[Event] = Collector(self.delivery_timeout)
        await manager.consume_events(events)
        await events.take(5)
        await _eventually_backlog(manager, 0, self.delivery_timeout)

    @pytest.mark.conformance
    async def test_events_behind_one_being_applied_wait_in_order_and_are_counted(
        self, connect: Callable[[], Awaitable[Transport]]
    ) -> None:
        """While the handler applies one event, later ones wait -- a consumer may
        take them ahead (RabbitMQ takes up to 64) but never hands one to the
        handler before the one before it is done -- and ``events_backlog``
        counts every event not yet applied, the one being applied included."""
        server, manager = await connect(), await connect()
        release = asyncio.Event()
        got: list[Event] = []
        in_flight = 0
        most = 0

        async def handle(event: Event) -> None:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            got.append(event)
            if len(got) == 1:
                await release.wait()
            in_flight -= 1

        await manager.consume_events(handle)
        await server.publish_event(_event("s", 0))
        deadline = asyncio.get_running_loop().time() + self.delivery_timeout
        while not got:
            assert asyncio.get_running_loop().time() < deadline, "the first event never came"
            await asyncio.sleep(0.02)
        for n in range(1, 11):
            await server.publish_event(_event("s", n))
        counts = await manager.events_backlog() is not None
        if counts:
            await _eventually_backlog(manager, 11, self.delivery_timeout)
        await asyncio.sleep(0.2)
        assert len(got) == 1  # none applied before the first is done
        release.set()
        while len(got) < 11:
            assert asyncio.get_running_loop().time() < deadline + 10, f"only {len(got)} came"
            await asyncio.sleep(0.02)
        assert got == [_event("s", n) for n in range(11)]
        assert most == 1
        if counts:
            await _eventually_backlog(manager, 0, self.delivery_timeout)

    @pytest.mark.conformance
    async def test_only_one_events_consumer_is_active_and_another_takes_over(
        self, connect: Callable[[], Awaitable[Transport]]
    ) -> None:
        server, first, second = await connect(), await connect(), await connect()
        in_flight = 0
        most = 0
        got: dict[str, list[Event]] = {"first": [], "second": []}
        arrived: asyncio.Queue[str] = asyncio.Queue()

        def handler(name: str) -> Callable[[Event], Awaitable[None]]:
            async def handle(event: Event) -> None:
                nonlocal in_flight, most
                in_flight += 1
                most = max(most, in_flight)
                for _ in range(3):
                    await asyncio.sleep(0)  # give a second consumer every chance to overlap
                in_flight -= 1
                got[name].append(event)
                arrived.put_nowait(name)

            return handle

        subscriptions = {
            "first": await first.consume_events(handler("first")),
            "second": await second.consume_events(handler("second")),
        }
        for n in range(10):
            await server.publish_event(_event("s", n))
        for _ in range(10):
            await asyncio.wait_for(arrived.get(), self.delivery_timeout)
        assert most == 1
        active = "first" if got["first"] else "second"
        standby = "second" if active == "first" else "first"
        assert got[active] == [_event("s", n) for n in range(10)]
        assert got[standby] == []
        await subscriptions[active].close()
        for n in range(10, 15):
            await server.publish_event(_event("s", n))
        for _ in range(5):
            assert await asyncio.wait_for(arrived.get(), self.delivery_timeout) == standby
        assert got[standby] == [_event("s", n) for n in range(10, 15)]
        assert most == 1

    async def _five_events(
        self,
        connect: Callable[[], Awaitable[Transport]],
        fail: Callable[[int, list[int]], None],
        handled: int,
    ) -> tuple[Transport, list[int], list[int]]:
        """Publish events 0..4 to a manager whose handler first calls ``fail(n,
        attempts so far)`` (which may raise); returns the manager, the first
        ``handled`` events handled, and every attempt."""
        server, manager = await connect(), await connect()
        attempts: list[int] = []
        done: asyncio.Queue[int] = asyncio.Queue()

        async def handle(event: Event) -> None:
            assert isinstance(event, JobStarted)
            attempts.append(event.fence)
            fail(event.fence, attempts)
            done.put_nowait(event.fence)

        await manager.consume_events(handle)
        for n in range(5):
            await server.publish_event(_event("s", n))
        got = [await asyncio.wait_for(done.get(), self.delivery_timeout) for _ in range(handled)]
        return manager, got, attempts

    @pytest.mark.conformance
    async def test_an_event_whose_handler_raised_is_delivered_again_in_order(
        self, connect: Callable[[], Awaitable[Transport]]
    ) -> None:
        def fail(n: int, attempts: list[int]) -> None:
            if n == 2 and attempts.count(2) == 1:
                raise RuntimeError("the database is down (simulated)")

        _, handled, attempts = await self._five_events(connect, fail, 5)
        assert handled == [0, 1, 2, 3, 4]
        assert attempts == [0, 1, 2, 2, 3, 4]

    @pytest.mark.conformance
    async def test_an_event_whose_handler_raised_dead_letter_is_not_delivered_again(
        self, connect: Callable[[], Awaitable[Transport]]
    ) -> None:
        def fail(n: int, attempts: list[int]) -> None:
            if n == 2:
                raise DeadLetter("event 2 can never be stored (simulated)")

        manager, handled, attempts = await self._five_events(connect, fail, 4)
        assert handled == [0, 1, 3, 4]
        assert attempts == [0, 1, 2, 3, 4]
        # Gone for good: not to this manager, nor to one that takes over.
        await manager.close()
        later: Collector[Event] = Collector(self.delivery_timeout)
        await (await connect()).consume_events(later)
        await later.quiet(self.settle_time)
        assert attempts == [0, 1, 2, 3, 4]


async def _eventually_backlog(transport: Transport, expected: int, within: float) -> None:
    """Wait until ``events_backlog`` says ``expected`` (a broker counts with a lag)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        backlog = await transport.events_backlog()
        if backlog == expected:
            return
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"events_backlog is {backlog}, expected {expected}")
        await asyncio.sleep(0.05)
