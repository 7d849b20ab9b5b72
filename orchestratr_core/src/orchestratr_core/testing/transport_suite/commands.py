"""Transport conformance, commands and cancellations."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from orchestratr_core.protocol import CancelJob, Command, StopJob, StopReason
from orchestratr_core.testing.transport_suite._common import _MARKER, Collector, SuiteSettings
from orchestratr_core.transport import Transport

__all__ = ["CommandTests"]


class CommandTests(SuiteSettings):
    """Commands and cancellations."""

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
