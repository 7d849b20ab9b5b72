"""The core's transport conformance suite, run against the real broker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import pytest

from orchestratr_core.testing import TransportConformance
from orchestratr_core.testing.transport_suite import QueueKind, RawPublisher, TransportFactory
from orchestratr_rabbitmq import RabbitMQTransport
from tests.support.rabbitmq import BROKER_URL

pytestmark = pytest.mark.rabbitmq


class TestRabbitMQQuorumTransport(TransportConformance):
    """Quorum queues, the default."""

    queue_type = "quorum"

    @pytest.fixture
    async def transport_factory(self, make_transport) -> TransportFactory:  # type: ignore[no-untyped-def]
        def make() -> RabbitMQTransport:
            return make_transport(queue_type=self.queue_type)

        return make

    @pytest.fixture
    async def raw_publisher(self, namespace: str) -> AsyncIterator[RawPublisher]:
        connection = await aio_pika.connect(BROKER_URL)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)

        async def publish(kind: QueueKind, payload: bytes) -> None:
            message = aio_pika.Message(payload, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            if kind == "commands":
                exchange = await channel.get_exchange(f"{namespace}.broadcast", ensure=False)
                await exchange.publish(message, "", mandatory=True)
            else:
                await channel.default_exchange.publish(
                    message, f"{namespace}.{kind}", mandatory=True
                )

        yield publish
        await connection.close()


class TestRabbitMQClassicTransport(TestRabbitMQQuorumTransport):
    """Classic queues (``queue_type="classic"``): the same contract; the delivery
    count is only the redelivered flag (see docs/rabbitmq.md)."""

    queue_type = "classic"
