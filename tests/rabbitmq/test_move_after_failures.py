"""After failures in a row a server hands a job back and a different server takes
its next start: on the real broker, whose requeue puts the message back at the
head of the queue (the server that handed it back may get it again first)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from orchestratr_core import JobArgument, OrchestratedServer, ServerOptions, StopToken
from orchestratr_rabbitmq import RabbitMQTransport
from tests.support.cluster import eventually, idle_job, job_message

pytestmark = pytest.mark.rabbitmq

MakeTransport = Callable[..., RabbitMQTransport]

OPTIONS = ServerOptions(heartbeat_interval=0.5, restart_initial=0.05, restart_max=0.2)


async def test_a_job_failing_on_one_server_moves_to_another_on_rabbitmq(
    make_transport: MakeTransport,
) -> None:
    failures: list[int] = []

    async def broken_here(arg: JobArgument, token: StopToken, heartbeat: object) -> None:
        failures.append(arg.fence)
        raise RuntimeError("this host lacks a library")

    publisher = make_transport()
    await publisher.connect()
    a = OrchestratedServer(broken_here, transport=make_transport(), name="a", options=OPTIONS)
    b = OrchestratedServer(idle_job, transport=make_transport(), name="b", options=OPTIONS)
    await a.start()
    try:
        message = job_message(0)
        await publisher.publish_job(message)
        await eventually(lambda: len(failures) >= 1, 15.0, what="failed on a")
        await b.start()
        await eventually(lambda: message.job_id in b.running(), 20.0, what="running on b")
        assert message.job_id not in a.running()
        moves = OPTIONS.move_after_failures
        assert moves <= len(failures) <= 4 * moves  # a few bounces at most, not for ever
    finally:
        await b.kill()
        await a.kill()
        await publisher.close()
