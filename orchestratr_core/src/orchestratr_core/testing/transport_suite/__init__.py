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

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from orchestratr_core.testing.transport_suite._common import (
    Collector,
    QueueKind,
    RawPublisher,
    TransportFactory,
)
from orchestratr_core.testing.transport_suite.commands import CommandTests
from orchestratr_core.testing.transport_suite.events import EventTests
from orchestratr_core.testing.transport_suite.jobs import JobTests
from orchestratr_core.testing.transport_suite.malformed import MalformedMessageTests
from orchestratr_core.testing.transport_suite.pools import PoolTests
from orchestratr_core.transport import Transport

__all__ = ["Collector", "QueueKind", "RawPublisher", "TransportConformance", "TransportFactory"]


# pytest collects the last base first: jobs, events, commands, malformed messages, pools
class TransportConformance(PoolTests, MalformedMessageTests, CommandTests, EventTests, JobTests):
    """The transport contract. Subclass it (as ``Test...``) and provide
    ``transport_factory`` and ``raw_publisher`` (see the module docstring)."""

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
