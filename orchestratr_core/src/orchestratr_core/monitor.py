"""Read-only views of the fleet: ``OrchestratorMonitor`` (paged) and
``AdminOrchestratorMonitor`` (unpaged)."""

from __future__ import annotations

import dataclasses

from orchestratr_core.errors import InvalidJobInput, UnknownJob, UnknownServer
from orchestratr_core.job import JobPage, JobQuery, JobRecord, ServerQuery, ServerRecord
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
        return await self._storage.list_jobs(query, with_total=with_total)

    async def job(self, job_id: str) -> JobRecord:
        """One job by id, whatever its status.

        :raises UnknownJob: no job has this id.
        """
        record = await self._storage.get_job(job_id)
        if record is None:
            raise UnknownJob(job_id)
        return record

    async def servers(self, query: ServerQuery | None = None) -> list[ServerRecord]:
        """Servers (by default the live ones) with the jobs running on each."""
        return await self._storage.list_servers(query or ServerQuery())

    async def server(self, server_id: str) -> ServerRecord:
        """One server with its running jobs.

        :raises UnknownServer: no server has this id.
        """
        record = await self._storage.get_server(server_id)
        if record is None:
            raise UnknownServer(server_id)
        return record


class AdminOrchestratorMonitor(OrchestratorMonitor):
    """Like :class:`OrchestratorMonitor`, plus unpaged listings (they may be large)."""

    async def all_jobs(self, query: JobQuery | None = None) -> list[JobRecord]:
        """Every job matching the filters, in creation order (``limit`` ignored)."""
        base = dataclasses.replace(query or JobQuery(), limit=None, after=None, offset=0)
        page = await self._storage.list_jobs(base)
        return list(page.items)
