"""What an idle job costs a server on the real RabbitMQ transport: Python memory and
objects per held delivery (counted, not timed). The structure refactor (issue 13)
split the transport into a package; these pin its per-delivery cost so that a
closure, a task or a buffer kept per delivery shows up here and not only as a
benchmark figure (docs/benchmarks.md, "Structure refactor (issue 13)")."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Callable

import pytest

from orchestratr_core import OrchestratedServer, ServerOptions
from orchestratr_rabbitmq import RabbitMQTransport
from tests.support.cluster import eventually, idle_job, job_message

pytestmark = pytest.mark.rabbitmq

MakeTransport = Callable[..., RabbitMQTransport]

JOBS = 300


def _objects() -> int:
    gc.collect()
    return len(gc.get_objects())


async def test_an_idle_job_on_rabbitmq_costs_a_bounded_number_of_objects_and_bytes(
    make_transport: MakeTransport,
) -> None:
    publisher = make_transport()
    await publisher.connect()
    server = OrchestratedServer(
        idle_job,
        transport=make_transport(),
        name="fp",
        max_workers=JOBS,
        # No freezing: every object of a running job stays visible to gc.get_objects().
        options=ServerOptions(heartbeat_interval=0.5, freeze_gc=False),
    )
    await server.start()
    try:
        await asyncio.sleep(0.5)  # the first heartbeats are out
        objects_before = _objects()
        tracemalloc.start()
        try:
            bytes_before = tracemalloc.get_traced_memory()[0]
            await asyncio.gather(*(publisher.publish_job(job_message(i)) for i in range(JOBS)))
            await eventually(lambda: len(server.running()) == JOBS, 60.0, 0.05, "all running")
            await asyncio.sleep(1.2)  # a few heartbeats: the outbox is empty again
            objects = (_objects() - objects_before) / JOBS
            per_job = (tracemalloc.get_traced_memory()[0] - bytes_before) / JOBS
        finally:
            tracemalloc.stop()
    finally:
        await server.kill()
    # Measured on the package (9f7c794) and on the single-module transport before it
    # (de46776) alike: ~38.9 objects and ~6.7 KB per job (tasks, frames, token, run,
    # delivery and its lost event, renewal timer, decoded message, heartbeat entry).
    # The margins catch a few objects or a buffer kept per delivery, not the noise.
    assert objects <= 42, f"{objects:.1f} gc-tracked objects per idle job"
    assert per_job < 8_000, f"{per_job:.0f} bytes per idle job"
