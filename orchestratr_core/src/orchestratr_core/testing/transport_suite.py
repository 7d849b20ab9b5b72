"""The transport conformance suite: the contract of :mod:`orchestratr_core.transport` as tests.

A backend author subclasses :class:`TransportConformance` in a test module and
provides two fixtures::

    import pytest
    from orchestratr_core.testing import TransportConformance

    class TestMyTransport(TransportConformance):
        @pytest.fixture
        async def transport_factory(self):
            namespace = fresh_namespace()  # an empty vhost / queue prefix per test
            made = []

            def make():
                transport = MyTransport(namespace=namespace)
                made.append(transport)
                return transport

            yield make
            for transport in made:
                await transport.close()
            await drop(namespace)

        @pytest.fixture
        async def raw_publisher(self, transport_factory):
            async def publish(kind, payload):
                ...  # put ``payload`` as is on the jobs / events queue, or
                # broadcast it to every server's command queue ("commands")
            return publish

``transport_factory`` returns a callable that builds a **new, not yet
connected** transport on the same, initially empty broker namespace each time
it is called (the suite builds a manager and several servers from it), and
cleans up after the test. ``raw_publisher`` returns an async callable
``(kind, payload)`` with ``kind`` one of ``"jobs"``, ``"events"``,
``"commands"`` that puts raw bytes on that queue, bypassing the codec.

Waiting: every positive check returns as soon as the message arrives and gives
up after :attr:`TransportConformance.delivery_timeout` seconds. A check that
something does *not* arrive has nothing to wait for, so it watches for
:attr:`TransportConformance.settle_time` seconds; raise it for a slow broker.

Loss through faults that need broker-specific injection (kill -9, silent
partition, consumer timeout, broker restart) is not generic: test it next to
your backend. This suite checks the generic part: a ``close()`` marks the
transport's deliveries lost and gives their messages to another server.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, Literal, TypeVar

import pytest

from orchestratr_core.errors import DeadLetter, DeliveryLost
from orchestratr_core.protocol import (
    CancelJob,
    Command,
    Event,
    JobMessage,
    JobStarted,
    ReleaseJobs,
    RunningJob,
    ServerHeartbeat,
    StopJob,
    StopReason,
    encode,
)
from orchestratr_core.transport import Delivery, Transport

__all__ = ["Collector", "QueueKind", "RawPublisher", "TransportConformance", "TransportFactory"]

_T = TypeVar("_T")

TransportFactory = Callable[[], Transport]
"""Builds a new, not yet connected transport on the test's broker namespace."""

QueueKind = Literal["jobs", "events", "commands"]
"""Where :data:`RawPublisher` puts bytes (``"commands"``: broadcast to every server)."""

RawPublisher = Callable[[QueueKind, bytes], Awaitable[None]]
"""Puts raw bytes on a queue, bypassing the codec."""


class Collector(Generic[_T]):
    """A handler that records what it is given, and waits for it in tests."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.items: list[_T] = []
        self._queue: asyncio.Queue[_T] = asyncio.Queue()

    async def __call__(self, item: _T) -> None:
        """The handler: record ``item``."""
        self.items.append(item)
        self._queue.put_nowait(item)

    async def next(self) -> _T:
        """The next item received (waits up to ``timeout`` seconds)."""
        try:
            return await asyncio.wait_for(self._queue.get(), self.timeout)
        except TimeoutError:
            pytest.fail(f"nothing arrived within {self.timeout} s (so far: {self.items!r})")

    async def take(self, count: int) -> list[_T]:
        """The next ``count`` items received."""
        return [await self.next() for _ in range(count)]

    async def quiet(self, seconds: float) -> None:
        """Fail if anything arrives within ``seconds``."""
        try:
            item = await asyncio.wait_for(self._queue.get(), seconds)
        except TimeoutError:
            return
        pytest.fail(f"unexpected arrival: {item!r}")


def _job(tag: str, number: int = 0, generation: int = 1) -> JobMessage:
    return JobMessage(
        job_id=f"{tag}-{number}",
        name=f"job {number} of {tag} \u00fcn\u00efc\u00f6de \u2603",
        argument=f'{{"n": {number}, "text": "a\\nb"}}',
        generation=generation,
        created_at=1_700_000_000.5 + number,
        heartbeat_timeout=30.0 if number % 2 else None,
    )


def _event(server_id: str, number: int) -> JobStarted:
    return JobStarted(server_id=server_id, job_id=f"job-{number}", fence=number, at=float(number))


_MARKER = ReleaseJobs(count=0, hold=None)


class TransportConformance:
    """The transport contract. Subclass it (as ``Test...``) and provide
    ``transport_factory`` and ``raw_publisher`` (see the module docstring)."""

    delivery_timeout: float = 10.0
    """Longest wait for something that must arrive."""
    settle_time: float = 0.3
    """How long a check that nothing arrives watches."""

    # -- fixtures the backend provides -------------------------------------------------

    @pytest.fixture
    def transport_factory(self) -> TransportFactory:
        """Override: a callable building new, unconnected transports (see module doc)."""
        pytest.fail("the TransportConformance subclass must provide a transport_factory fixture")

    @pytest.fixture
    def raw_publisher(self) -> RawPublisher:
        """Override: an async ``(kind, payload)`` callable putting raw bytes on a queue."""
        pytest.fail("the TransportConformance subclass must provide a raw_publisher fixture")

    # -- the suite's own fixtures ------------------------------------------------------

    @pytest.fixture
    async def connect(
        self, transport_factory: TransportFactory
    ) -> AsyncIterator[Callable[[], Awaitable[Transport]]]:
        """An async callable returning a new connected transport, closed after the test."""
        made: list[Transport] = []

        async def make() -> Transport:
            transport = transport_factory()
            made.append(transport)
            await transport.connect()
            return transport

        yield make
        for transport in reversed(made):
            with contextlib.suppress(Exception):
                await transport.close()

    @pytest.fixture
    def tag(self) -> str:
        """A prefix making this test's job ids unique."""
        return uuid.uuid4().hex[:12]

    # -- jobs --------------------------------------------------------------------------

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

    # -- events ------------------------------------------------------------------------

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

    # -- commands and cancellations ----------------------------------------------------

    @pytest.mark.conformance
    async def test_a_command_to_one_server_reaches_only_that_server(
        self, connect: Callable[[], Awaitable[Transport]]
    ) -> None:
        manager, one, two = await connect(), await connect(), await connect()
        to_one: Collector[Command] = Collector(self.delivery_timeout)
        to_two: Collector[Command] = Collector(self.delivery_timeout)
        await one.consume_commands("server-one", to_one)
        await two.consume_commands("server-two", to_two)
        stop = StopJob(job_id="j", reason=StopReason.RELEASED, drop=False, max_fence=5)
        await manager.send_command(stop, "server-one")
        await manager.send_command(_MARKER)
        assert await to_one.take(2) == [stop, _MARKER]
        assert await to_two.next() == _MARKER
        await to_two.quiet(self.settle_time)
        await to_one.quiet(self.settle_time)

    @pytest.mark.conformance
    async def test_a_broadcast_reaches_every_server(
        self, connect: Callable[[], Awaitable[Transport]]
    ) -> None:
        manager = await connect()
        servers = [await connect() for _ in range(3)]
        inboxes: list[Collector[Command]] = []
        for n, server in enumerate(servers):
            inbox: Collector[Command] = Collector(self.delivery_timeout)
            await server.consume_commands(f"server-{n}", inbox)
            inboxes.append(inbox)
        await manager.send_command(_MARKER)
        for inbox in inboxes:
            assert await inbox.next() == _MARKER
        for inbox in inboxes:
            await inbox.quiet(self.settle_time)

    @pytest.mark.conformance
    async def test_a_command_for_a_server_that_is_not_there_is_accepted(
        self, connect: Callable[[], Awaitable[Transport]]
    ) -> None:
        manager, server = await connect(), await connect()
        inbox: Collector[Command] = Collector(self.delivery_timeout)
        await server.consume_commands("present", inbox)
        await manager.send_command(_MARKER, "absent")
        await manager.send_command(StopJob(job_id="j", reason=StopReason.CANCELLED, drop=True))
        assert await inbox.next() == StopJob(job_id="j", reason=StopReason.CANCELLED, drop=True)
        await inbox.quiet(self.settle_time)

    @pytest.mark.conformance
    async def test_cancellations_are_in_the_snapshot_of_a_server_that_subscribes_later(
        self, connect: Callable[[], Awaitable[Transport]]
    ) -> None:
        manager = await connect()
        empty = await connect()
        _, snapshot = await empty.consume_commands(
            "first", Collector[Command](self.delivery_timeout)
        )
        assert snapshot == frozenset()
        await manager.set_cancellations({"a", "b"})
        late = await connect()
        _, snapshot = await late.consume_commands("late", Collector[Command](self.delivery_timeout))
        assert snapshot == frozenset({"a", "b"})
        await manager.set_cancellations(["c"])
        later = await connect()
        _, snapshot = await later.consume_commands(
            "later", Collector[Command](self.delivery_timeout)
        )
        assert snapshot == frozenset({"c"})

    @pytest.mark.conformance
    async def test_new_cancellations_reach_a_subscribed_server_as_cancel_job(
        self, connect: Callable[[], Awaitable[Transport]]
    ) -> None:
        manager, server = await connect(), await connect()
        await manager.set_cancellations({"a", "b"})
        inbox: Collector[Command] = Collector(self.delivery_timeout)
        _, snapshot = await server.consume_commands("s", inbox)
        assert snapshot == frozenset({"a", "b"})
        await manager.set_cancellations({"a", "b", "c"})
        await manager.send_command(_MARKER)
        assert await inbox.take(2) == [CancelJob(job_id="c"), _MARKER]
        await manager.set_cancellations({"c"})  # removals are not broadcast
        await manager.set_cancellations({"c", "d", "e"})
        await manager.send_command(_MARKER)
        received = await inbox.take(3)
        assert received[-1] == _MARKER
        assert sorted(received[:2], key=repr) == [CancelJob(job_id="d"), CancelJob(job_id="e")]
        await inbox.quiet(self.settle_time)

    # -- malformed messages -------------------------------------------------------------

    _BAD_PAYLOADS: dict[str, bytes] = {
        "not-json": b"\xff\xfe this is not JSON {",
        "not-an-object": b"[1, 2, 3]",
        "newer-version": b'{"v": 999, "type": "job", "job_id": "x", "future": true}',
        "missing-fields": b'{"v": 1, "type": "job", "job_id": "x"}',
        "unknown-type": b'{"v": 1, "type": "launch-missiles"}',
        # Hostile input (issue 11): nothing may escape the decoder but "malformed".
        "deeply-nested": b'{"v": 1, "type": "started", "x": '
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}",
        "infinity": b'{"v":1,"type":"release","count":1000,"hold":0,"hold_for":Infinity}',
        "fence-out-of-range": b'{"v":1,"type":"started","server_id":"s","job_id":"x",'
        b'"fence":9223372036854775808,"at":0}',
        "generation-out-of-range": b'{"v":1,"type":"job","job_id":"x","name":"n",'
        b'"argument":"","generation":2147483648,"created_at":0}',
    }
    _WRONG_KIND: dict[str, bytes] = {
        "jobs": encode(CancelJob(job_id="x")),
        "events": encode(JobMessage("x", "n", "", 1, 0.0)),
        "commands": encode(JobStarted(server_id="s", job_id="x", fence=1, at=0.0)),
    }

    @pytest.mark.conformance
    @pytest.mark.parametrize("kind", ["jobs", "events", "commands"])
    @pytest.mark.parametrize("bad", [*_BAD_PAYLOADS, "foreign-kind"])
    async def test_malformed_messages_do_not_stop_the_consumer(
        self,
        connect: Callable[[], Awaitable[Transport]],
        raw_publisher: RawPublisher,
        tag: str,
        kind: QueueKind,
        bad: str,
    ) -> None:
        payload = self._WRONG_KIND[kind] if bad == "foreign-kind" else self._BAD_PAYLOADS[bad]
        manager, server = await connect(), await connect()
        if kind == "jobs":
            deliveries: Collector[Delivery] = Collector(self.delivery_timeout)
            await server.consume_jobs(1, deliveries)  # the bad one must not use up capacity
            await raw_publisher("jobs", payload)
            await manager.publish_job(_job(tag))
            assert (await deliveries.next()).message == _job(tag)
            await deliveries.quiet(self.settle_time)
        elif kind == "events":
            events: Collector[Event] = Collector(self.delivery_timeout)
            await manager.consume_events(events)
            await raw_publisher("events", payload)
            await server.publish_event(_event("s", 1))
            assert await events.next() == _event("s", 1)
            await events.quiet(self.settle_time)
        else:
            commands: Collector[Command] = Collector(self.delivery_timeout)
            await server.consume_commands("s", commands)
            await raw_publisher("commands", payload)
            await manager.send_command(_MARKER, "s")
            assert await commands.next() == _MARKER
            await commands.quiet(self.settle_time)
