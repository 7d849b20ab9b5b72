"""Job deliveries: one message held unacknowledged on the jobs channel of one session."""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any, Protocol

import aiormq.abc

from orchestratr_core.errors import MalformedMessage
from orchestratr_core.protocol import JobMessage
from orchestratr_core.transport import Delivery
from orchestratr_rabbitmq.topology import Topology

if TYPE_CHECKING:
    from orchestratr_rabbitmq.transport.session import Session

__all__ = ["Holder", "RabbitDelivery", "delivery_count", "delivery_tag"]


class Holder(Protocol):
    """The consumer that holds a delivery and settles it."""

    async def settle(self, delivery: RabbitDelivery, ack: bool) -> None:
        """Acknowledge (``ack``) or requeue ``delivery``."""
        ...

    def forget_renewal(self, delivery: RabbitDelivery) -> None:
        """``delivery`` need not be handed back before a broker timeout any more."""
        ...


class RabbitDelivery(Delivery):
    """One job delivery held on the jobs channel of one session."""

    def __init__(
        self,
        consumer: Holder,
        session: Session,
        channel: aiormq.abc.AbstractChannel,
        delivery_tag: int,
        consumer_tag: str,
        message: JobMessage,
        delivery_count: int,
    ) -> None:
        self._consumer = consumer
        self.session = session
        self.channel = channel
        self.delivery_tag = delivery_tag
        self.consumer_tag = consumer_tag
        self._message = message
        self._delivery_count = delivery_count
        self._lost = asyncio.Event()
        self._lost_at = math.inf
        self.settled = False
        self.renew_at = math.inf
        """Monotonic time at which the job is handed back before a broker timeout
        (the holder keeps one timer for all its deliveries)."""

    @property
    def message(self) -> JobMessage:
        """The decoded job message."""
        return self._message

    @property
    def delivery_count(self) -> int:
        """Prior deliveries of this message (``x-delivery-count`` / ``x-acquired-count``)."""
        return self._delivery_count

    @property
    def lost(self) -> asyncio.Event:
        """Set when the session that delivered this job died or was fenced."""
        return self._lost

    @property
    def valid_until(self) -> float:
        """Monotonic deadline until which this delivery is certainly ours: the send
        time of the newest fence ping the broker answered plus ``fence_timeout``
        (earlier if the job is due to be handed back before a broker timeout)."""
        if self._lost.is_set():
            return self._lost_at
        return min(self.session.lease_deadline(), self.renew_at)

    def cancel_renewal(self) -> None:
        """No hand-back before a broker timeout any more (settled or lost)."""
        if self.renew_at != math.inf:
            self._consumer.forget_renewal(self)

    def mark_lost(self) -> None:
        """Give the delivery up (idempotent, synchronous)."""
        self.cancel_renewal()
        if not self._lost.is_set():
            self._lost_at = time.monotonic()
        self._lost.set()

    async def ack(self) -> None:
        """Remove the message for good; :class:`DeliveryLost` if it was lost."""
        await self._consumer.settle(self, True)

    async def release(self) -> None:
        """Requeue the message; :class:`DeliveryLost` if it was lost."""
        await self._consumer.settle(self, False)

    def __repr__(self) -> str:
        return (
            f"<RabbitMQ delivery job={self._message.job_id} count={self._delivery_count} "
            f"lost={self._lost.is_set()}>"
        )


def delivery_tag(message: aiormq.abc.DeliveredMessage) -> int:
    """The delivery tag of ``message``; :class:`MalformedMessage` without one."""
    tag = getattr(message.delivery, "delivery_tag", None)
    if not isinstance(tag, int):
        raise MalformedMessage("a delivery without a delivery tag")
    return tag


def delivery_count(message: aiormq.abc.DeliveredMessage, topology: Topology) -> int:
    """How many times the broker delivered ``message`` before (the fence's count)."""
    if not getattr(message.delivery, "redelivered", False):
        # A first delivery: any count header is the publisher's, not the broker's (a
        # forged x-delivery-count would otherwise raise the fence of a replayed job).
        return 0
    headers: dict[str, Any] = dict(message.header.properties.headers or {})
    counts = [
        value
        for key in ("x-delivery-count", "x-acquired-count")
        if isinstance(value := headers.get(key), int) and not isinstance(value, bool)
    ]
    if counts:
        return max(counts)
    if topology.queue_type == "classic":
        # Classic queues keep no count: only "delivered before", a weaker fence.
        return 1 if getattr(message.delivery, "redelivered", False) else 0
    return 0
