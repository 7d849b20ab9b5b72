"""OrchestratR transport on RabbitMQ (aio-pika).

Select it with ``transport="rabbitmq"`` or an ``amqp://`` / ``amqps://`` URL. The
transport holds each job as an unacknowledged delivery on a quorum queue, fences
itself when it stops hearing from the broker, and treats any loss of the channel,
connection or consumer that delivered a job as loss of that job. See
``docs/rabbitmq.md``.
"""

from __future__ import annotations

from orchestratr_rabbitmq.settings import Settings
from orchestratr_rabbitmq.topology import BrokerVersion, Topology
from orchestratr_rabbitmq.transport import RabbitMQTransport

__all__ = ["BrokerVersion", "RabbitMQTransport", "Settings", "Topology"]
