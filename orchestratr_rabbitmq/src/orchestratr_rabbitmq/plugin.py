"""The ``rabbitmq`` plugin: builds a :class:`~orchestratr_rabbitmq.RabbitMQTransport`.

Importing this module does not import aio-pika; building a transport does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestratr_core.errors import MissingDriver
from orchestratr_core.plugin import hookimpl

if TYPE_CHECKING:
    from orchestratr_core.plugin.manager import BackendSpec
    from orchestratr_core.transport import Transport

__all__ = ["PLUGIN_NAME", "orchestratr_make_transport"]

PLUGIN_NAME = "rabbitmq"
"""The name this plugin answers to (``transport="rabbitmq"``)."""


@hookimpl
def orchestratr_make_transport(spec: BackendSpec) -> Transport | None:
    """Return a new, unconnected RabbitMQ transport for ``spec.plugin == "rabbitmq"``."""
    if spec.plugin != PLUGIN_NAME:
        return None
    try:
        import aio_pika  # noqa: F401 - only to report a missing driver clearly
    except ImportError:
        raise MissingDriver(PLUGIN_NAME, "aio-pika", "orchestratr-rabbitmq") from None
    from orchestratr_rabbitmq.transport import RabbitMQTransport

    return RabbitMQTransport(spec.url, **dict(spec.options))
