"""The broker's delivery acknowledgement timeout (``consumer_timeout``), set to 60 s at
run time as in ``rabbitmq-facts.md``. These take minutes: ``-m slow``. Run on 3.10.8
(the shared node) and on 4.0.5 (``ORCHESTRATR_TEST_BROKER=rabbitmq4``, ``make
test-rabbitmq4``), where the jobs queue's ``x-consumer-timeout`` applies instead."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

import pytest

from orchestratr_core.protocol import JobMessage
from orchestratr_core.transport import Delivery
from orchestratr_rabbitmq import RabbitMQTransport
from orchestratr_rabbitmq.topology import CONSUMER_TIMEOUT_MS
from tests.support.rabbitmq import rabbitmqctl

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

MakeTransport = Callable[..., RabbitMQTransport]


@pytest.fixture
def consumer_timeout_60s() -> Iterator[None]:
    """Set the broker-wide timeout to 60 s (new channels only); restore it after."""
    previous = rabbitmqctl("eval", "application:get_env(rabbit, consumer_timeout).").strip()
    rabbitmqctl("eval", "application:set_env(rabbit, consumer_timeout, 60000).")
    try:
        yield
    finally:
        if previous.startswith("{ok,"):
            value = previous.removeprefix("{ok,").removesuffix("}")
            rabbitmqctl("eval", f"application:set_env(rabbit, consumer_timeout, {value}).")
        else:
            rabbitmqctl("eval", "application:unset_env(rabbit, consumer_timeout).")


class Ledger:
    """Every delivery of the job, and whether an older one was still live when a
    newer one arrived (two live copies at one instant)."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.overlaps = 0
        self.arrived = asyncio.Queue[Delivery]()

    async def __call__(self, delivery: Delivery) -> None:
        self.overlaps += sum(not d.lost.is_set() for d in self.deliveries)
        self.deliveries.append(delivery)
        self.arrived.put_nowait(delivery)


async def test_an_expired_delivery_is_lost_before_its_single_redelivery(
    make_transport: MakeTransport,
    consumer_timeout_60s: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = make_transport()
    server = make_transport(reconnect_delay=0.1)  # consumer_timeout unknown to us
    await manager.connect()
    await server.connect()
    ledger = Ledger()
    with caplog.at_level(logging.WARNING, "orchestratr"):
        await server.consume_jobs(1, ledger)
    assert any("consumer_timeout, undefined" in r.getMessage() for r in caplog.records) or (
        server.topology is not None and server.topology.consumer_timeout_configurable
    )
    await manager.publish_job(
        JobMessage(job_id="long", name="long", argument="", generation=1, created_at=0.0)
    )
    first = await asyncio.wait_for(ledger.arrived.get(), 10)
    assert server.topology is not None
    if server.topology.consumer_timeout_configurable:
        # 3.12-4.2 (run on 4.0.5): the jobs queue's own x-consumer-timeout (24.8 days)
        # wins over the broker-wide 60 s, so the broker never tears the job away.
        assert server.topology.jobs_arguments()["x-consumer-timeout"] == CONSUMER_TIMEOUT_MS
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ledger.arrived.get(), 150)
        assert not first.lost.is_set()
        assert not [r for r in caplog.records if "session lost" in r.getMessage()]
        await first.ack()
        assert len(ledger.deliveries) == 1
        return
    # 3.10: the broker checks about once a minute: expiry comes 60-120 s after delivery.
    second = await asyncio.wait_for(ledger.arrived.get(), 150)
    assert first.lost.is_set()
    assert ledger.overlaps == 0
    assert second.delivery_count == first.delivery_count + 1
    assert not second.lost.is_set()
    await second.ack()
    await asyncio.sleep(2)
    assert len(ledger.deliveries) == 2


async def test_a_known_consumer_timeout_is_never_reached_jobs_are_handed_back_first(
    make_transport: MakeTransport,
    consumer_timeout_60s: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = make_transport()
    server = make_transport(consumer_timeout=60.0)
    await manager.connect()
    await server.connect()
    ledger = Ledger()
    await server.consume_jobs(1, ledger)
    await manager.publish_job(
        JobMessage(job_id="long", name="long", argument="", generation=1, created_at=0.0)
    )
    with caplog.at_level(logging.INFO, "orchestratr"):
        first = await asyncio.wait_for(ledger.arrived.get(), 10)
        second = await asyncio.wait_for(ledger.arrived.get(), 60)  # handed back at 45 s
        third = await asyncio.wait_for(ledger.arrived.get(), 60)  # and again
    assert first.lost.is_set() and second.lost.is_set()
    assert ledger.overlaps == 0
    assert [d.delivery_count for d in (first, second, third)] == [0, 1, 2]
    # The broker never had to close the channel.
    assert not [r for r in caplog.records if "session lost" in r.getMessage()]
    await third.ack()
