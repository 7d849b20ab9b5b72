"""Transport conformance, malformed messages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from orchestratr_core.protocol import CancelJob, Command, Event, JobMessage, JobStarted, encode
from orchestratr_core.testing.transport_suite._common import (
    _MARKER,
    Collector,
    QueueKind,
    RawPublisher,
    SuiteSettings,
    _event,
    _job,
)
from orchestratr_core.transport import Delivery, Transport

__all__ = ["MalformedMessageTests"]


class MalformedMessageTests(SuiteSettings):
    """Malformed messages."""

    _BAD_PAYLOADS: dict[str, bytes] = {
        "not-json": b"\xff\xfe this is not JSON {",
        "not-an-object": b"[1, 2, 3]",
        "newer-version": b'{"v": 999, "type": "job", "job_id": "x", "future": true}',
        "missing-fields": b'{"v": 1, "type": "job", "job_id": "x"}',
        "unknown-type": b'{"v": 1, "type": "launch-missiles"}',
        # Hostile input: nothing may escape the decoder but "malformed".
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
