"""Read-only views of the fleet: ``OrchestratorMonitor`` (paged) and
``AdminOrchestratorMonitor`` (unpaged)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime

from orchestratr_core.errors import InvalidJobInput, UnknownJob, UnknownServer
from orchestratr_core.job import (
    JobPage,
    JobQuery,
    JobRecord,
    JobStatus,
    ServerQuery,
    ServerRecord,
    ServerStatus,
)
from orchestratr_core.storage import Storage

__all__ = ["MAX_PAGE_SIZE", "AdminOrchestratorMonitor", "OrchestratorMonitor"]

MAX_PAGE_SIZE = 1000
"""Largest page :class:`OrchestratorMonitor` returns."""


class OrchestratorMonitor:
    """Jobs and servers as the manager's storage sees them, one page at a time."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def jobs(self, query: JobQuery | None = None, *, with_total: bool = True) -> JobPage:
        """One page of jobs in creation order. Pass ``page.next_cursor`` as
        ``JobQuery(after=...)`` for the next page.

        :raises InvalidJobInput: a page size outside 1..1000 or a negative offset.
        """
        query = query or JobQuery()
        if query.limit is None or not 1 <= query.limit <= MAX_PAGE_SIZE:
            raise InvalidJobInput(f"page size must be between 1 and {MAX_PAGE_SIZE}")
        if query.offset < 0:
            raise InvalidJobInput("offset must not be negative")
        page = await self._storage.list_jobs(query, with_total=with_total)
        return dataclasses.replace(page, items=tuple(await self._alive(page.items)))

    async def job(self, job_id: str) -> JobRecord:
        """One job by id, whatever its status.

        :raises UnknownJob: no job has this id.
        """
        record = await self._storage.get_job(job_id)
        if record is None:
            raise UnknownJob(job_id)
        return (await self._alive([record]))[0]

    async def servers(self, query: ServerQuery | None = None) -> list[ServerRecord]:
        """Servers (by default the live ones) with the jobs running on each."""
        return [_alive_on(s) for s in await self._storage.list_servers(query or ServerQuery())]

    async def server(self, server_id: str) -> ServerRecord:
        """One server with its running jobs.

        :raises UnknownServer: no server has this id.
        """
        record = await self._storage.get_server(server_id)
        if record is None:
            raise UnknownServer(server_id)
        return _alive_on(record)

    async def _alive(self, jobs: Sequence[JobRecord]) -> list[JobRecord]:
        """``jobs`` with :attr:`JobRecord.server_seen` filled for those running on a
        live server (one read of the live servers, without their jobs)."""
        if not any(job.status is JobStatus.PROCESSING and job.server_id for job in jobs):
            return list(jobs)
        servers = await self._storage.list_servers(ServerQuery(with_jobs=False))
        seen = {server.id: server.last_seen for server in servers}
        return [_seen(job, seen.get(job.server_id or "")) for job in jobs]


def _seen(job: JobRecord, last_seen: datetime | None) -> JobRecord:
    if job.status is not JobStatus.PROCESSING or last_seen is None:
        return job
    return dataclasses.replace(job, server_seen=last_seen)


def _alive_on(server: ServerRecord) -> ServerRecord:
    """``server`` with its running jobs' liveness its own, while it is live."""
    if server.status not in _LIVE or not server.running:
        return server
    running = tuple(_seen(job, server.last_seen) for job in server.running)
    return dataclasses.replace(server, running=running)


_LIVE = frozenset({ServerStatus.ALIVE, ServerStatus.DRAINING})


class AdminOrchestratorMonitor(OrchestratorMonitor):
    """Like :class:`OrchestratorMonitor`, plus unpaged listings (they may be large)."""

    async def all_jobs(self, query: JobQuery | None = None) -> list[JobRecord]:
        """Every job matching the filters, in creation order (``limit`` ignored)."""
        base = dataclasses.replace(query or JobQuery(), limit=None, after=None, offset=0)
        page = await self._storage.list_jobs(base)
        return list(page.items)
