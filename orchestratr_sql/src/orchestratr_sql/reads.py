"""The read-only half of :class:`~orchestratr_sql.storage.SqlStorage`: jobs and
servers by id, paged and filtered listings, counts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from orchestratr_core.job import (
    JobPage,
    JobQuery,
    JobRecord,
    JobStatus,
    ServerQuery,
    ServerRecord,
    ServerStatus,
)
from orchestratr_core.placement import Pool
from orchestratr_core.storage import SpreadJob
from orchestratr_sql.base import SqlStorageBase, split_list
from orchestratr_sql.connection import Connection
from orchestratr_sql.dialect import Dialect

__all__ = ["SqlReads", "job_listing_sql"]


class SqlReads(SqlStorageBase):
    """Queries that change nothing."""

    async def get_job(self, job_id: str) -> JobRecord | None:
        """One job by id."""

        async def read(conn: Connection) -> JobRecord | None:
            row = await conn.fetch_one(self._q["select_job"], {"id": job_id})
            return None if row is None else self._job(row)

        return await self._run("get_job", read, write=False, statement=True)

    async def get_jobs(self, job_ids: Sequence[str]) -> list[JobRecord]:
        """Several jobs by id in one query (a list parameter)."""
        if not job_ids:
            return []
        values = {"ids": self.dialect.id_list(list(dict.fromkeys(job_ids)))}

        async def read(conn: Connection) -> list[JobRecord]:
            return [
                self._job(row) for row in await conn.fetch(self._q["select_jobs_by_ids"], values)
            ]

        return await self._run("get_jobs", read, write=False, statement=True)

    async def list_jobs(self, query: JobQuery, *, with_total: bool = False) -> JobPage:
        """Keyset paging on the primary key (``id > :after ORDER BY id``), with
        the filters as index-served conditions assembled from fixed fragments."""
        listing = job_listing_sql(self.dialect, query)
        if listing is None:
            return JobPage(items=(), next_cursor=None, total=0 if with_total else None)
        sql, count_sql, params = listing

        async def read(conn: Connection) -> JobPage:
            rows = await conn.fetch(conn.adhoc("list_jobs", sql), params)
            total = None
            if with_total:
                counted = await conn.fetch_one(conn.adhoc("count_jobs", count_sql), params)
                total = int(counted["total"]) if counted is not None else 0
            items = [self._job(row) for row in rows]
            more = query.limit is not None and len(items) > query.limit
            if more:
                items = items[: query.limit]
            return JobPage(
                items=tuple(items),
                next_cursor=items[-1].id if more and items else None,
                total=total,
            )

        return await self._run("list_jobs", read, write=False)

    async def list_servers(self, query: ServerQuery) -> list[ServerRecord]:
        """Servers by name then id, with their running jobs in one more query."""
        conditions: list[str] = []
        params: dict[str, Any] = {}
        if query.statuses is not None:
            if not query.statuses:
                return []
            literals = ", ".join(f"'{ServerStatus(s).value}'" for s in sorted(query.statuses))
            conditions.append(f"status IN ({literals})")
        if query.name_prefix:
            fragment, extra = self.dialect.name_prefix(query.name_prefix)
            conditions.append(fragment)
            params.update(extra)
        sql = f"SELECT * FROM servers{_where(conditions)} ORDER BY name, id"

        async def read(conn: Connection) -> list[ServerRecord]:
            rows = await conn.fetch(conn.adhoc("list_servers", sql), params)
            running: dict[str, list[JobRecord]] = {}
            if query.with_jobs and rows:
                ids = self.dialect.id_list([str(row["id"]) for row in rows])
                for job_row in await conn.fetch(
                    self._q["select_running_jobs_of_servers"], {"ids": ids}
                ):
                    job = self._job(job_row)
                    running.setdefault(job.server_id or "", []).append(job)
            servers = [self._server(row, running.get(str(row["id"]), ())) for row in rows]
            # Few servers: labels and kinds are matched here, not in SQL.
            return [
                s
                for s in servers
                if (query.label is None or query.label in s.labels)
                and (query.kind is None or query.kind in s.kinds)
            ]

        return await self._run("list_servers", read, write=False)

    async def count_running_by_server(self) -> dict[str, int]:
        """Jobs ``processing`` per server: one ``GROUP BY``."""

        async def read(conn: Connection) -> dict[str, int]:
            rows = await conn.fetch(self._q["count_running_by_server"], {})
            return {str(row["server_id"]): int(row["running"]) for row in rows}

        return await self._run("count_running_by_server", read, write=False, statement=True)

    async def pending_pools(self) -> dict[Pool, int]:
        """Pending jobs per pool: one ``GROUP BY``."""

        async def read(conn: Connection) -> dict[Pool, int]:
            rows = await conn.fetch(self._q["pending_pools"], {})
            return {
                Pool(str(row["kind"]), split_list(row["requires"])): int(row["pending"])
                for row in rows
            }

        return await self._run("pending_pools", read, write=False, statement=True)

    async def count_running_by_pool(self) -> dict[tuple[str, Pool], int]:
        """Running jobs per server and pool: one ``GROUP BY``."""

        async def read(conn: Connection) -> dict[tuple[str, Pool], int]:
            rows = await conn.fetch(self._q["count_running_by_pool"], {})
            return {
                (str(row["server_id"]), Pool(str(row["kind"]), split_list(row["requires"]))): int(
                    row["running"]
                )
                for row in rows
            }

        return await self._run("count_running_by_pool", read, write=False, statement=True)

    async def running_spread_jobs(self) -> list[SpreadJob]:
        """The running jobs of spread groups: one query over the spread column."""

        async def read(conn: Connection) -> list[SpreadJob]:
            rows = await conn.fetch(self._q["running_spread_jobs"], {})
            return [
                SpreadJob(
                    str(row["id"]),
                    str(row["server_id"]),
                    Pool(str(row["kind"]), split_list(row["requires"])),
                    str(row["spread"]),
                    int(row["fence"]),
                )
                for row in rows
            ]

        return await self._run("running_spread_jobs", read, write=False, statement=True)

    async def get_server(self, server_id: str) -> ServerRecord | None:
        """One server with its running jobs."""

        async def read(conn: Connection) -> ServerRecord | None:
            row = await conn.fetch_one(self._q["select_server"], {"id": server_id})
            if row is None:
                return None
            jobs = await conn.fetch(
                self._q["select_running_jobs_of_server"], {"server_id": server_id}
            )
            return self._server(row, [self._job(job) for job in jobs])

        return await self._run("get_server", read, write=False)

    async def cancelled_job_ids(self, deleted_since: datetime) -> list[str]:
        """Ids of ``deleting`` jobs and of jobs ``deleted`` or ``completed`` since
        ``deleted_since``."""

        async def read(conn: Connection) -> list[str]:
            rows = await conn.fetch(
                self._q["select_cancelled_ids"], {"since": self._t(deleted_since)}
            )
            return [str(row["id"]) for row in rows]

        return await self._run("cancelled_job_ids", read, write=False, statement=True)


def job_listing_sql(dialect: Dialect, query: JobQuery) -> tuple[str, str, dict[str, Any]] | None:
    """The page query and the count query for ``query`` (``None``: nothing can
    match). Assembled from fixed fragments; values are parameters. The page
    query fetches one row more than the limit to know whether more follow."""
    if query.limit is not None and query.limit <= 0:
        return None
    conditions: list[str] = []
    params: dict[str, Any] = {}
    if query.statuses is not None:
        if not query.statuses:
            return None
        literals = ", ".join(f"'{JobStatus(s).value}'" for s in sorted(query.statuses))
        conditions.append(f"status IN ({literals})")
    elif not query.include_deleted:
        conditions.append("status <> 'deleted'")
    if query.name_prefix:
        fragment, extra = dialect.name_prefix(query.name_prefix)
        conditions.append(fragment)
        params.update(extra)
    if query.server_id is not None:
        conditions.append("server_id = :filter_server_id")
        params["filter_server_id"] = query.server_id
    if query.kind is not None:
        conditions.append("kind = :filter_kind")
        params["filter_kind"] = query.kind
    base = list(conditions)
    if query.after is not None:
        conditions.append("id > :after_id")
        params["after_id"] = query.after
    fetch = None if query.limit is None else query.limit + 1
    page, page_params = dialect.page(fetch, max(0, int(query.offset)))
    params.update(page_params)
    sql = f"SELECT * FROM jobs{_where(conditions)} ORDER BY id {page}".rstrip()
    count_sql = f"SELECT COUNT(*) AS total FROM jobs{_where(base)}"
    return sql, count_sql, params


def _where(conditions: Sequence[str]) -> str:
    return f" WHERE {' AND '.join(conditions)}" if conditions else ""
