"""A storage outage longer than the server timeout (a PostgreSQL failover on a
loaded machine) must not make the leader declare live servers dead: their
heartbeats of the outage wait in the broker, and their rows are as old as the
outage when the storage answers again. Issue #16's slow view convergence after a
failover: the leader declared every server dead and moved all their jobs."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from orchestratr_core.errors import BackendUnavailable
from orchestratr_core.job import (
    JobEvent,
    JobRecord,
    JobStatus,
    ServerQuery,
    ServerRecord,
    ServerStatus,
    TransitionResult,
)
from orchestratr_core.protocol import ServerHeartbeat
from orchestratr_core.storage import OutboxItem
from orchestratr_memory import MemoryStorage
from tests.support.cluster import FAST_MANAGER, Cluster, eventually


class FailingOver(MemoryStorage):
    """The memory storage, unreachable while ``down`` (every call the manager's
    events and sweep make raises :class:`BackendUnavailable`)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise BackendUnavailable("the database is failing over")

    async def acquire_lease(self, name: str, holder: str, now: datetime, until: datetime) -> bool:
        self._check()
        return await super().acquire_lease(name, holder, now, until)

    async def apply_heartbeat(self, heartbeat: ServerHeartbeat, now: datetime) -> list[JobRecord]:
        self._check()
        return await super().apply_heartbeat(heartbeat, now)

    async def touch_servers(self, heartbeats: Sequence[tuple[ServerHeartbeat, datetime]]) -> None:
        self._check()
        await super().touch_servers(heartbeats)

    async def get_job(self, job_id: str) -> JobRecord | None:
        self._check()
        return await super().get_job(job_id)

    async def get_jobs(self, job_ids: Sequence[str]) -> list[JobRecord]:
        self._check()
        return await super().get_jobs(job_ids)

    async def transition(self, job_id: str, event: JobEvent, **kwargs: Any) -> TransitionResult:
        self._check()
        return await super().transition(job_id, event, **kwargs)

    async def claim_outbox(
        self, holder: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxItem]:
        self._check()
        return await super().claim_outbox(holder, now, lease_until, limit)

    async def list_servers(self, query: ServerQuery) -> list[ServerRecord]:
        self._check()
        return await super().list_servers(query)


async def test_a_storage_outage_longer_than_the_server_timeout_declares_no_live_server_dead(
    cluster: Cluster,
) -> None:
    storage = FailingOver()
    cluster.storage = storage
    # Every heartbeat written on arrival (none noted for a batched write): during
    # the outage the manager leaves the events queue, and the heartbeats wait.
    manager = await cluster.start_manager(dataclasses.replace(FAST_MANAGER, seen_batch=0))
    await cluster.add_server("a", 5)
    await cluster.add_server("b", 5)
    ids = await cluster.create(6)
    await cluster.wait_running(ids)
    # Leading for longer than the server timeout: its grace as a new leader is over.
    await asyncio.sleep(FAST_MANAGER.server_timeout + 0.5)
    assert manager.is_leader
    storage.down = True
    await asyncio.sleep(2 * FAST_MANAGER.server_timeout)  # the servers keep beating
    storage.down = False

    async def settled() -> bool:
        page = await storage.list_servers(ServerQuery(statuses=None))
        return all(s.status is ServerStatus.ALIVE for s in page) and len(page) == 2

    # The view converges, and no live server was declared dead meanwhile (its
    # jobs would have been released, and a failure counted against each).
    for _ in range(int(3 * FAST_MANAGER.server_timeout / 0.1)):
        assert await settled(), await storage.list_servers(ServerQuery(statuses=None))
        await asyncio.sleep(0.1)
    await eventually(lambda: all(len(cluster.ledger.of(j)) == 1 for j in ids), what="one copy")
    records = await storage.get_jobs(ids)
    assert all(r.restarts == 0 and not r.failure_log for r in records), records


async def test_a_stop_report_that_arrives_while_the_storage_is_unreachable_is_not_lost(
    cluster: Cluster,
) -> None:
    """The manager leaves the events queue while its storage does not answer: the
    event it was applying goes back to the broker and is applied once the storage
    answers -- a cancelled job's stop report included, or the job would stay
    ``deleting`` (its server dropped it and never reports it again)."""
    storage = FailingOver()
    cluster.storage = storage
    await cluster.start_manager(dataclasses.replace(FAST_MANAGER, seen_batch=0))
    await cluster.add_server("a", 5)
    (job_id,) = await cluster.create(1)
    await cluster.wait_running([job_id])
    await cluster.client.mark_on_deleting(job_id)
    storage.down = True  # before the server's stop report is applied
    await eventually(lambda: not cluster.ledger.running(job_id), what="copy stopped")
    await asyncio.sleep(2 * FAST_MANAGER.server_timeout)
    storage.down = False
    await cluster.wait_status(job_id, JobStatus.DELETED, timeout=10)
