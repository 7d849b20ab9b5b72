"""The publisher: one confirmed, signed, persistent publish on a session, and what
its failure means."""

from __future__ import annotations

import logging

import aio_pika
import aiormq

from orchestratr_core.errors import OrchestratrError, PublishError
from orchestratr_rabbitmq.settings import Settings
from orchestratr_rabbitmq.transport.authenticity import Authenticity
from orchestratr_rabbitmq.transport.errors import describe
from orchestratr_rabbitmq.transport.session import Session

__all__ = ["Publisher"]

log = logging.getLogger("orchestratr.transport.rabbitmq")


class Publisher:
    """Publishes on the publishing connection of a session, with confirms."""

    def __init__(self, settings: Settings, authenticity: Authenticity) -> None:
        self.settings = settings
        self.authenticity = authenticity

    async def publish(
        self,
        session: Session,
        exchange_name: str,
        routing_key: str,
        body: bytes,
        kind: str,
        *,
        drop_unroutable: bool = False,
    ) -> None:
        """Publish and wait for the broker's confirm; :class:`PublishError` otherwise
        (an unroutable message is dropped quietly with ``drop_unroutable``)."""
        user = self.settings.user
        headers = self.authenticity.headers(body, exchange_name, routing_key, user)
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            type=kind,
            app_id="orchestratr",
            # Validated by the broker (it refuses another user's name): receivers
            # can tell which broker user published a message.
            user_id=user,
            headers=headers or None,
        )
        where = exchange_name or routing_key
        try:
            async with session.bounded(self.settings.publish_timeout):
                exchange = await session.exchange(exchange_name)
                await exchange.publish(message, routing_key, mandatory=True)
        except aiormq.exceptions.PublishError:
            if drop_unroutable:
                log.debug("no queue bound for %s %r; dropped", kind, routing_key)
                return
            raise PublishError(
                f"RabbitMQ could not route the {kind} message to {where!r}: "
                "the queue does not exist (was the namespace deleted?)"
            ) from None
        except aiormq.exceptions.DeliveryError:
            raise PublishError(f"RabbitMQ refused to store the {kind} message (nack)") from None
        except TimeoutError:
            if not session.alive:
                raise PublishError(
                    f"the RabbitMQ connection was lost before the broker confirmed the "
                    f"{kind} message ({session.reason})"
                ) from None
            raise PublishError(
                f"RabbitMQ did not confirm the {kind} message within "
                f"{self.settings.publish_timeout:g}s"
            ) from None
        except OrchestratrError:
            raise
        except Exception as exc:
            raise PublishError(f"publishing the {kind} message failed: {describe(exc)}") from None
