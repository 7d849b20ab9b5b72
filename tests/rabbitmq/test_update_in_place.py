"""The server half of an update in place on RabbitMQ: an ``@updatable`` copy takes
the new argument without a restart, and after its owner dies the broker's old
message (the old argument) is dropped under a drop mark, never started."""

from __future__ import annotations

from collections.abc import Callable

from orchestratr_rabbitmq import RabbitMQTransport
from tests.support.inplace import run_drop_mark_scenario


async def test_the_old_message_is_dropped_after_an_update_in_place_and_the_owners_death(
    make_transport: Callable[..., RabbitMQTransport],
) -> None:
    await run_drop_mark_scenario(make_transport, timeout=10.0)
