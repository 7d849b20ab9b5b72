"""The outbox relay re-sends a waiting job's message under a new generation, on the
real broker and database: a client whose outbox completion never comes (as in a
PostgreSQL failover, or under load) leaves its row to the relay while its first
message still waits in the queue; two servers then take one message each. Before
the fix both carried the same generation, so both copies ran under one fencing
token (the gap of docs/reliability.md, "PostgreSQL failover")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from orchestratr_core.client import OrchestratorClient
from orchestratr_core.job import JobStatus, split_fence
from orchestratr_core.manager import ServerManager
from orchestratr_core.server import OrchestratedServer
from orchestratr_rabbitmq import RabbitMQTransport
from orchestratr_sql import SqlStorage
from tests.support.cluster import FAST_MANAGER, FAST_SERVER, Ledger, eventually

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgresql]

MakeTransport = Callable[..., RabbitMQTransport]


async def test_a_relayed_job_runs_under_a_new_token_while_its_first_message_waits(
    make_transport: MakeTransport, pg_storage: SqlStorage, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="orchestratr")
    ledger = Ledger()
    manager = ServerManager(storage=pg_storage, transport=make_transport(), options=FAST_MANAGER)
    await manager.start()
    client_transport = make_transport()
    await client_transport.connect()
    slow = OrchestratorClient(
        pg_storage, client_transport, holder="slow-client", outbox_flush_interval=3600
    )
    servers: list[OrchestratedServer] = []
    try:
        job_id = await slow.create_job("sent-twice")
        # After the client's lease (2 s) the relay sends the message again while
        # the first one still waits in the queue (no server yet).
        await eventually(
            lambda: "outbox relay sent 1 item(s)" in caplog.text, timeout=15, what="relayed"
        )
        for name in ("a", "b"):
            server = OrchestratedServer(
                ledger.job(name),
                transport=make_transport(),
                name=name,
                max_workers=1,
                options=FAST_SERVER,
            )
            await server.start()
            servers.append(server)
        await eventually(lambda: len(ledger.of(job_id)) == 2, timeout=15, what="both copies")
        await eventually(lambda: len(ledger.running(job_id)) == 1, timeout=15, what="one left")

        async def owned() -> bool:
            job = await pg_storage.get_job(job_id)
            return job is not None and job.status is JobStatus.PROCESSING

        await eventually(owned, timeout=15, what="processing")
        await asyncio.sleep(1.0)
        copies = ledger.of(job_id)
        assert len(copies) == 2
        fences = sorted(c.fence for c in copies)
        assert fences[0] != fences[1], f"two copies under one fencing token {fences}"
        assert [split_fence(f)[0] for f in fences] == [1, 2]
        (running,) = ledger.running(job_id)
        job = await pg_storage.get_job(job_id)
        assert job is not None
        assert (job.generation, job.fence) == (2, running.fence) and running.fence == fences[1]
    finally:
        for server in servers:
            await server.kill()
        await slow.close()
        await manager.stop()
