"""The RabbitMQ transport, one module per concern (read in this order): ``errors``
(classification, tidying up), ``authenticity`` (signing), ``deliveries``,
``session`` (connections, declarations, the fence), ``publisher``,
``cancellations`` (the set and its lock), ``consumers`` (jobs, events, commands)
and ``rabbitmq`` (:class:`RabbitMQTransport`, which ties them together)."""

from __future__ import annotations

from orchestratr_rabbitmq.transport.rabbitmq import RabbitMQTransport

__all__ = ["RabbitMQTransport"]
