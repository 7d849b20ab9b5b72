"""The one implementation of :class:`orchestratr_core.storage.Storage` for every
SQL dialect. Dialect differences live in the ``.sql`` files and in
:mod:`orchestratr_sql.dialect`; driver differences in the plugin modules'
:class:`~orchestratr_sql.connection.Connector`.

Every method is one transaction, retried as a whole on transient failures
(lost connection, deadlock, serialization failure) with exponential backoff.
Every status change is a guarded ``UPDATE`` whose affected-row count says
whether it applied; the row is then read back in the same transaction.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from orchestratr_core.backend_urls import DEFAULT_SQLITE_URL
from orchestratr_core.errors import (
    BackendUnavailable,
    ConfigurationError,
    DataRejected,
    DuplicateJobName,
    OrchestratrError,
    PermanentBackendError,
    UnknownJob,
)
from orchestratr_core.job import (
    JobEvent,
    JobPage,
    JobQuery,
    JobRecord,
    JobStatus,
    NewJob,
    ServerQuery,
    ServerRecord,
    ServerStatus,
    TransitionResult,
)
from orchestratr_core.plugin.manager import BackendSpec
from orchestratr_core.protocol import ServerHeartbeat
from orchestratr_core.retry import backoff_delay
from orchestratr_core.storage import (
    REASON_CANCEL_REQUESTED,
    REASON_NOT_REPORTED,
    REASON_SERVER_DEAD,
    REASON_SERVER_LEFT,
    OutboxItem,
    OutboxKind,
    Storage,
    check_heartbeat,
    check_transition,
)
from orchestratr_sql.connection import Connection, Connector, ErrorKind, Row, scrub
from orchestratr_sql.dialect import Dialect, get_dialect
from orchestratr_sql.queries import load_queries, multi_row_values, values_query
from orchestratr_sql.url import DatabaseUrl, parse_url

__all__ = [
    "SqlStorage",
    "backend_error",
    "build_storage",
    "job_listing_sql",
    "make_connector",
    "storage_from_url",
]

log = logging.getLogger("orchestratr.storage.sql")

T = TypeVar("T")

_TRANSITION_QUERY = {
    JobEvent.START: "transition_start",
    JobEvent.RELEASE: "transition_release",
    JobEvent.COMPLETE: "transition_complete",
    JobEvent.FAIL: "transition_fail",
    JobEvent.CANCEL: "transition_cancel",
    JobEvent.CONFIRM_DELETED: "transition_confirm_deleted",
}
"""Which guarded UPDATE of common.sql implements which row of TRANSITIONS."""


def backend_error(
    connector: Connector, exc: BaseException, kind: ErrorKind, what: str
) -> Exception:
    """The OrchestratR error for a classified driver error: one line, URL
    masked, driver text scrubbed of secrets."""
    where = f"{connector.product} at {connector.url.masked}"
    detail = scrub(str(exc) or type(exc).__name__, connector.url.secrets)
    if kind is ErrorKind.AUTH:
        return PermanentBackendError(
            f"{where}: authentication failed, check the user and password ({detail})"
        )
    if kind is ErrorKind.UNKNOWN_DATABASE:
        return PermanentBackendError(
            f"{where}: the database does not exist, create it first ({detail})"
        )
    if kind is ErrorKind.DATA:
        return DataRejected(f"{where} refused a value ({what}): {detail}"[:1000])
    return BackendUnavailable(f"{where} is unavailable ({what}): {detail}")


class SqlStorage(Storage):
    """A manager's storage on a SQL database.

    Build one with :func:`storage_from_url` (or through the plugin manager) and
    call :meth:`open` before use.
    """

    def __init__(self, connector: Connector, dialect: Dialect) -> None:
        self.connector = connector
        self.dialect = dialect
        self.url: DatabaseUrl = connector.url
        self._q = load_queries(dialect.name, connector.style)
        # PostgreSQL inserts a job and its outbox row in one statement.
        self._one_statement_create = "create_job" in self._q
        self._opened = False

    def __repr__(self) -> str:
        return f"SqlStorage({self.dialect.name}, {self.url.masked!r})"

    # -- plumbing ---------------------------------------------------------------------

    async def _run(
        self,
        what: str,
        fn: Callable[[Connection], Awaitable[T]],
        *,
        write: bool = True,
        on_unique: Callable[[], Exception] | None = None,
        statement: bool = False,
    ) -> T:
        """Run ``fn`` in one transaction, retrying transient failures.
        ``statement``: ``fn`` runs exactly one statement, which is atomic by
        itself, so it may run without ``BEGIN``/``COMMIT`` where the driver
        allows (:meth:`Connector.statement`)."""
        options = self.url.options
        attempt = 0
        while True:
            attempt += 1
            try:
                if statement:
                    scope = self.connector.statement(write=write)
                else:
                    scope = self.connector.transaction(write=write)
                async with scope as conn:
                    return await fn(conn)
            except OrchestratrError:
                raise
            except Exception as exc:
                kind = self.connector.classify(exc)
                if kind is None:
                    raise
                if kind is ErrorKind.UNIQUE:
                    if on_unique is None:
                        raise
                    raise on_unique() from None
                if kind in (ErrorKind.AUTH, ErrorKind.UNKNOWN_DATABASE, ErrorKind.DATA):
                    raise backend_error(self.connector, exc, kind, what) from None
                if attempt >= options.retries:
                    error = backend_error(self.connector, exc, kind, f"{what}, {attempt} attempts")
                    log.error("%s", error)
                    raise error from None
                delay = backoff_delay(attempt, options.retry_initial, options.retry_max)
                log.warning(
                    "%s on %s at %s failed (%s: %s); attempt %d of %d, retrying in %.2fs",
                    what,
                    self.connector.product,
                    self.url.masked,
                    kind.value,
                    scrub(str(exc) or type(exc).__name__, self.url.secrets),
                    attempt,
                    options.retries,
                    delay,
                )
                await asyncio.sleep(delay)

    def _t(self, value: datetime | None) -> Any:
        return self.dialect.time_in(value)

    def _time(self, value: Any) -> datetime:
        out = self.dialect.time_out(value)
        if out is None:
            raise ValueError("a required time column is NULL")
        return out

    def _job(self, row: Row) -> JobRecord:
        d = self.dialect
        return JobRecord(
            id=str(row["id"]),
            name=str(row["name"]),
            argument=str(row["argument"]),
            status=JobStatus(row["status"]),
            server_id=None if row["server_id"] is None else str(row["server_id"]),
            fence=int(row["fence"]),
            generation=int(row["generation"]),
            created_at=self._time(row["created_at"]),
            updated_at=self._time(row["updated_at"]),
            started_at=d.time_out(row["started_at"]),
            last_heartbeat=d.time_out(row["last_heartbeat"]),
            restarts=int(row["restarts"]),
            last_error=row["last_error"],
            reason=row["reason"],
            heartbeat_timeout=(
                None if row["heartbeat_timeout"] is None else float(row["heartbeat_timeout"])
            ),
        )

    def _server(self, row: Row, running: Sequence[JobRecord] = ()) -> ServerRecord:
        return ServerRecord(
            id=str(row["id"]),
            name=str(row["name"]),
            max_workers=int(row["max_workers"]),
            status=ServerStatus(row["status"]),
            started_at=self._time(row["started_at"]),
            last_seen=self._time(row["last_seen"]),
            host=str(row["host"]),
            pid=int(row["pid"]),
            running=tuple(running),
        )

    def _outbox(self, row: Row) -> OutboxItem:
        return OutboxItem(
            id=int(row["id"]),
            job_id=str(row["job_id"]),
            kind=OutboxKind(row["kind"]),
            generation=int(row["generation"]),
            created_at=self._time(row["created_at"]),
        )

    def _insert_values(self, job: NewJob) -> dict[str, Any]:
        return {
            "id": job.id,
            "name": job.name,
            "argument": job.argument,
            "generation": job.generation,
            "heartbeat_timeout": job.heartbeat_timeout,
            "now": self._t(job.created_at),
        }

    # -- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        """Create the pool (retrying an unreachable database like any operation)
        and, unless ``migrate=false``, apply pending migrations under a lock."""
        if self._opened:
            return
        options = self.url.options
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.connector.open()
                break
            except OrchestratrError:
                raise
            except Exception as exc:
                kind = self.connector.classify(exc)
                if kind is None or kind is ErrorKind.UNIQUE:
                    raise
                if kind in (ErrorKind.AUTH, ErrorKind.UNKNOWN_DATABASE, ErrorKind.DATA):
                    raise backend_error(self.connector, exc, kind, "connect") from None
                if attempt >= options.retries:
                    raise backend_error(
                        self.connector, exc, kind, f"connect, {attempt} attempts"
                    ) from None
                delay = backoff_delay(attempt, options.retry_initial, options.retry_max)
                log.warning(
                    "cannot reach %s at %s (%s); retrying in %.2fs",
                    self.connector.product,
                    self.url.masked,
                    scrub(str(exc) or type(exc).__name__, self.url.secrets),
                    delay,
                )
                await asyncio.sleep(delay)
        self._opened = True
        if options.migrate:
            from orchestratr_sql.schema import guard, migrate

            try:
                await guard(self.connector, migrate(self.connector, self.dialect))
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        """Close the pool. Idempotent."""
        self._opened = False
        await self.connector.close()

    # -- jobs -------------------------------------------------------------------------

    async def create_job(self, job: NewJob, holder: str, lease_until: datetime) -> JobRecord:
        """Insert the job and its ``publish`` outbox row atomically; the partial
        unique index on the name decides between concurrent creates.

        PostgreSQL: one statement (``create_job``, data-modifying CTEs) without
        ``BEGIN``/``COMMIT``, one round trip. Elsewhere: both ``INSERT`` s in one
        transaction, and the record is built from what was inserted (read back
        where the dialect cannot promise it stored every value as sent)."""
        values = {
            **self._insert_values(job),
            "job_id": job.id,
            "kind": OutboxKind.PUBLISH.value,
            "holder": holder,
            "lease_until": self._t(lease_until),
        }

        async def create_in_one(conn: Connection) -> JobRecord:
            row = await conn.fetch_one(self._q["create_job"], values)
            if row is None:  # pragma: no cover - RETURNING returns the row
                raise RuntimeError("inserted job row is not visible")
            return self._job(row)

        async def create(conn: Connection) -> JobRecord:
            await conn.execute(self._q["insert_job"], values)
            await conn.execute(self._q["insert_outbox"], values)
            if self.dialect.stored_as_sent:
                return job.record()
            row = await conn.fetch_one(self._q["select_job"], {"id": job.id})
            if row is None:  # pragma: no cover - we just inserted it
                raise RuntimeError("inserted job row is not visible")
            return self._job(row)

        try:
            if self._one_statement_create:
                return await self._run(
                    "create_job",
                    create_in_one,
                    on_unique=lambda: DuplicateJobName(job.name),
                    statement=True,
                )
            return await self._run(
                "create_job", create, on_unique=lambda: DuplicateJobName(job.name)
            )
        except DuplicateJobName:
            # A retry after a lost commit acknowledgement finds our own row.
            existing = await self.get_job(job.id)
            if existing is not None and existing.name == job.name:
                return existing
            raise

    async def create_jobs(
        self, jobs: Sequence[NewJob], holder: str, lease_until: datetime
    ) -> list[JobRecord]:
        """All jobs and their ``publish`` outbox rows in one transaction, all or
        nothing. PostgreSQL: ``create_jobs`` (``unnest`` of parallel arrays, both
        tables in one statement; one round trip when it fits one chunk).
        Elsewhere: multi-row ``INSERT`` s of ``insert_job`` rows, chunked to the
        dialect's parameter and packet limits, each followed by
        ``insert_outbox_for_jobs``. A taken name is found afterwards and named."""
        jobs = list(jobs)
        if not jobs:
            return []
        names: set[str] = set()
        ids: set[str] = set()
        for job in jobs:
            if job.name in names:
                raise DuplicateJobName(job.name)
            if job.id in ids:
                raise ValueError(f"job id {job.id!r} occurs twice in the batch")
            names.add(job.name)
            ids.add(job.id)
        chunks = self._insert_chunks(jobs)
        common = {
            "kind": OutboxKind.PUBLISH.value,
            "holder": holder,
            "lease_until": self._t(lease_until),
        }

        async def insert(conn: Connection) -> list[JobRecord]:
            records: list[JobRecord] = []
            for chunk in chunks:
                if self._one_statement_create:
                    rows = await conn.fetch(
                        self._q["create_jobs"],
                        {
                            **common,
                            "ids": [job.id for job in chunk],
                            "names": [job.name for job in chunk],
                            "arguments": [job.argument for job in chunk],
                            "generations": [job.generation for job in chunk],
                            "created": [self._t(job.created_at) for job in chunk],
                            "timeouts": [job.heartbeat_timeout for job in chunk],
                        },
                    )
                    records.extend(self._job(row) for row in rows)
                    continue
                query = values_query(
                    self.dialect.name, "insert_job", len(chunk), self.connector.style
                )
                await conn.execute(
                    query, multi_row_values([self._insert_values(job) for job in chunk])
                )
                await conn.execute(
                    self._q["insert_outbox_for_jobs"],
                    {**common, "ids": self.dialect.id_list([job.id for job in chunk])},
                )
            if not self._one_statement_create:
                if self.dialect.stored_as_sent:
                    records = [job.record() for job in jobs]
                else:
                    rows = await conn.fetch(
                        self._q["select_jobs_by_ids"],
                        {"ids": self.dialect.id_list([job.id for job in jobs])},
                    )
                    records = [self._job(row) for row in rows]
            by_id = {record.id: record for record in records}
            return [by_id[job.id] for job in jobs]

        single = self._one_statement_create and len(chunks) == 1
        for _ in range(max(1, self.url.options.retries)):
            try:
                return await self._run(
                    "create_jobs", insert, on_unique=_BatchConflict, statement=single
                )
            except _BatchConflict:
                pass
            # A retry after a lost commit acknowledgement finds our own rows.
            mine = {record.id: record for record in await self.get_jobs(list(ids))}
            if len(mine) == len(jobs) and all(mine[job.id].name == job.name for job in jobs):
                return [mine[job.id] for job in jobs]
            taken = await self._taken_names([job.name for job in jobs])
            for job in jobs:
                if taken.get(job.name, job.id) != job.id:
                    raise DuplicateJobName(job.name)
            # The job that held a name was deleted since: try again.
        raise BackendUnavailable(
            f"{self.connector.product} at {self.url.masked}: create_jobs kept hitting the "
            "unique name index without a conflicting job left to name; retry"
        )

    def _insert_chunks(self, jobs: Sequence[NewJob]) -> list[list[NewJob]]:
        """Split a batch into statements of at most ``dialect.insert_rows`` rows
        and about ``dialect.insert_bytes`` bytes of names and arguments."""
        chunks: list[list[NewJob]] = []
        current: list[NewJob] = []
        size = 0
        for job in jobs:
            weight = len(job.name.encode("utf-8")) + len(job.argument.encode("utf-8")) + 128
            if current and (
                len(current) >= self.dialect.insert_rows
                or size + weight > self.dialect.insert_bytes
            ):
                chunks.append(current)
                current, size = [], 0
            current.append(job)
            size += weight
        if current:
            chunks.append(current)
        return chunks

    async def _taken_names(self, names: Sequence[str]) -> dict[str, str]:
        """Name -> id of the jobs not deleted that hold one of ``names`` (compared
        exactly here too, whatever the database's comparison)."""
        wanted = set(names)

        async def read(conn: Connection) -> dict[str, str]:
            rows = await conn.fetch(
                self._q["select_active_names"], {"names": self.dialect.text_list(list(wanted))}
            )
            return {str(row["name"]): str(row["id"]) for row in rows if str(row["name"]) in wanted}

        return await self._run("create_jobs (names)", read, write=False, statement=True)

    async def request_cancel(
        self, job_id: str, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool]:
        """Guarded ``CANCEL`` plus a ``cancel`` outbox row, in one transaction."""
        values = {"id": job_id, "now": self._t(now), "reason": REASON_CANCEL_REQUESTED}

        async def cancel(conn: Connection) -> tuple[JobRecord, bool]:
            changed = await conn.execute(self._q["transition_cancel"], values)
            row = await conn.fetch_one(self._q["select_job"], values)
            if row is None:
                raise UnknownJob(job_id)
            job = self._job(row)
            if changed:
                await conn.execute(
                    self._q["insert_outbox"],
                    {
                        "job_id": job_id,
                        "kind": OutboxKind.CANCEL.value,
                        "generation": job.generation,
                        "now": self._t(now),
                        "holder": holder,
                        "lease_until": self._t(lease_until),
                    },
                )
            return job, changed > 0

        return await self._run("request_cancel", cancel)

    async def transition(
        self,
        job_id: str,
        event: JobEvent,
        *,
        server_id: str | None,
        fence: int,
        now: datetime,
        error: str | None = None,
        restarts: int | None = None,
        reason: str | None = None,
    ) -> TransitionResult:
        """One guarded UPDATE (see ``common.sql``), then the row as it is now."""
        name = _TRANSITION_QUERY.get(event)
        if name is None:
            raise ValueError(f"{event.value} is applied by expire_servers/server_left")
        check_transition(fence, restarts)
        values = {
            "id": job_id,
            "server_id": server_id,
            "fence": int(fence),
            "now": self._t(now),
            "error": error,
            "restarts": restarts,
            "reason": reason,
        }

        async def apply(conn: Connection) -> TransitionResult:
            changed = await conn.execute(self._q[name], values)
            row = await conn.fetch_one(self._q["select_job"], values)
            return TransitionResult(
                applied=changed > 0, job=None if row is None else self._job(row)
            )

        return await self._run(f"transition {event.value}", apply)

    async def apply_heartbeat(self, heartbeat: ServerHeartbeat, now: datetime) -> list[JobRecord]:
        """Four statements whatever the number of jobs: upsert the server, apply
        ``START`` to every reported job (one set-based UPDATE), read back the
        reports that did not apply, release the jobs the server no longer runs."""
        check_heartbeat(heartbeat)  # JSON_TABLE / json_each would not refuse a huge fence
        values: dict[str, Any] = {
            "id": heartbeat.server_id,
            "server_id": heartbeat.server_id,
            "name": heartbeat.name,
            "max_workers": int(heartbeat.max_workers),
            "host": heartbeat.host,
            "pid": int(heartbeat.pid),
            "status": (ServerStatus.DRAINING if heartbeat.draining else ServerStatus.ALIVE).value,
            "started_at": self._t(datetime.fromtimestamp(heartbeat.started_at, UTC)),
            "now": self._t(now),
            "reason": REASON_NOT_REPORTED,
        }
        values.update(self.dialect.heartbeat_batch(heartbeat.jobs, now))

        async def ingest(conn: Connection) -> list[JobRecord]:
            await conn.execute(self._q["upsert_server"], values)
            rejected: list[JobRecord] = []
            if heartbeat.jobs:
                await conn.execute(self._q["heartbeat_start_jobs"], values)
                rows = await conn.fetch(self._q["heartbeat_rejected_jobs"], values)
                rejected = [self._job(row) for row in rows]
            await conn.execute(self._q["heartbeat_release_unreported"], values)
            return rejected

        return await self._run("apply_heartbeat", ingest)

    async def expire_servers(self, seen_before: datetime, now: datetime) -> list[ServerRecord]:
        """Guarded ``alive|draining -> dead`` per silent server, each followed by
        ``SERVER_LOST`` for its jobs; a concurrent manager's guard fails."""
        before = self._t(seen_before)

        async def expire(conn: Connection) -> list[ServerRecord]:
            marked: list[ServerRecord] = []
            for row in await conn.fetch(self._q["select_expired_servers"], {"seen_before": before}):
                server_id = row["id"]
                changed = await conn.execute(
                    self._q["mark_server_dead"], {"id": server_id, "seen_before": before}
                )
                if not changed:
                    continue
                await conn.execute(
                    self._q["release_server_jobs"],
                    {"server_id": server_id, "now": self._t(now), "reason": REASON_SERVER_DEAD},
                )
                fresh = await conn.fetch_one(self._q["select_server"], {"id": server_id})
                marked.append(self._server(fresh if fresh is not None else row))
            return marked

        return await self._run("expire_servers", expire)

    async def server_left(self, server_id: str, now: datetime) -> bool:
        """Mark the server ``left`` and release its jobs (``SERVER_LOST``)."""

        async def leave(conn: Connection) -> bool:
            if not await conn.execute(self._q["mark_server_left"], {"id": server_id}):
                return False
            await conn.execute(
                self._q["release_server_jobs"],
                {"server_id": server_id, "now": self._t(now), "reason": REASON_SERVER_LEFT},
            )
            return True

        return await self._run("server_left", leave)

    # -- outbox and leases ------------------------------------------------------------

    async def claim_outbox(
        self, holder: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxItem]:
        """Mark up to ``limit`` claimable rows with a fresh claim id (row locks /
        ``SKIP LOCKED`` / ``READPAST`` per dialect), then read them back."""
        if limit <= 0:
            return []
        values = {
            "holder": holder,
            "now": self._t(now),
            "until": self._t(lease_until),
            "limit": int(limit),
            "claim_id": str(uuid.uuid4()),
        }

        async def claim(conn: Connection) -> list[OutboxItem]:
            await conn.execute(self._q["claim_outbox"], values)
            rows = await conn.fetch(self._q["select_claimed_outbox"], values)
            return [self._outbox(row) for row in rows]

        return await self._run("claim_outbox", claim)

    async def complete_outbox(self, ids: Sequence[int]) -> None:
        """Delete these outbox rows in one statement."""
        if not ids:
            return
        values = {"ids": self.dialect.int_list(list(ids))}

        async def delete(conn: Connection) -> None:
            await conn.execute(self._q["delete_outbox"], values)

        await self._run("complete_outbox", delete, statement=True)

    async def complete_outbox_for_job(self, job_id: str, kind: OutboxKind, holder: str) -> int:
        """Delete ``holder``'s claimed rows of ``kind`` for ``job_id``."""
        values = {"job_id": job_id, "kind": OutboxKind(kind).value, "holder": holder}

        async def delete(conn: Connection) -> int:
            return await conn.execute(self._q["delete_outbox_for_job"], values)

        return await self._run("complete_outbox_for_job", delete, statement=True)

    async def complete_outbox_for_jobs(
        self, job_ids: Sequence[str], kind: OutboxKind, holder: str
    ) -> int:
        """Delete ``holder``'s claimed rows of ``kind`` for these jobs: one
        statement per 5,000 ids."""
        unique = list(dict.fromkeys(job_ids))
        deleted = 0
        for start in range(0, len(unique), _DELETE_CHUNK):
            values = {
                "ids": self.dialect.id_list(unique[start : start + _DELETE_CHUNK]),
                "kind": OutboxKind(kind).value,
                "holder": holder,
            }

            async def delete(conn: Connection, values: dict[str, Any] = values) -> int:
                return await conn.execute(self._q["delete_outbox_for_jobs"], values)

            deleted += await self._run("complete_outbox_for_jobs", delete, statement=True)
        return deleted

    async def acquire_lease(self, name: str, holder: str, now: datetime, until: datetime) -> bool:
        """Renew-or-steal with a guarded UPDATE; else insert if absent. Of two
        racing managers the database lets one win."""
        values = {"name": name, "holder": holder, "now": self._t(now), "until": self._t(until)}

        async def lease(conn: Connection) -> bool:
            if await conn.execute(self._q["lease_update"], values):
                return True
            return await conn.execute(self._q["lease_insert"], values) > 0

        try:
            return await self._run("acquire_lease", lease, on_unique=_LeaseTaken)
        except _LeaseTaken:
            return False

    async def cancelled_job_ids(self, deleted_since: datetime) -> list[str]:
        """Ids of ``deleting`` jobs and of jobs ``deleted`` or ``completed`` since
        ``deleted_since``."""

        async def read(conn: Connection) -> list[str]:
            rows = await conn.fetch(
                self._q["select_cancelled_ids"], {"since": self._t(deleted_since)}
            )
            return [str(row["id"]) for row in rows]

        return await self._run("cancelled_job_ids", read, write=False, statement=True)

    # -- queries ----------------------------------------------------------------------

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
            return [self._server(row, running.get(str(row["id"]), ())) for row in rows]

        return await self._run("list_servers", read, write=False)

    async def count_running_by_server(self) -> dict[str, int]:
        """Jobs ``processing`` per server: one ``GROUP BY``."""

        async def read(conn: Connection) -> dict[str, int]:
            rows = await conn.fetch(self._q["count_running_by_server"], {})
            return {str(row["server_id"]): int(row["running"]) for row in rows}

        return await self._run("count_running_by_server", read, write=False, statement=True)

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

    async def set_server_status(self, server_id: str, status: ServerStatus, now: datetime) -> bool:
        """Set a server's status; False for an unknown server."""
        values = {"id": server_id, "status": ServerStatus(status).value}

        async def update(conn: Connection) -> bool:
            return await conn.execute(self._q["set_server_status"], values) > 0

        return await self._run("set_server_status", update, statement=True)


class _LeaseTaken(Exception):
    """A concurrent manager inserted the lease row first."""


class _BatchConflict(Exception):
    """A batch insert hit the unique name index (which name is looked up after)."""


_DELETE_CHUNK = 5000
"""Ids per outbox ``DELETE`` of :meth:`SqlStorage.complete_outbox_for_jobs`."""


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


_MODULES = {
    "sqlite": "orchestratr_sql.sqlite",
    "postgresql": "orchestratr_sql.postgresql",
    "mysql": "orchestratr_sql.mysql",
    "sqlserver": "orchestratr_sql.sqlserver",
}


def make_connector(url: DatabaseUrl) -> tuple[Connector, Dialect]:
    """The connector and dialect for ``url``, importing only that plugin's module."""
    import importlib

    module = importlib.import_module(_MODULES[url.dialect])
    connector: Connector = module.make_connector(url)
    dialect = get_dialect(url.options.sql_dialect or url.dialect)
    return connector, dialect


def storage_from_url(url: str, **options: Any) -> SqlStorage:
    """A (not yet opened) storage for a database URL, e.g.
    ``storage_from_url("sqlite:///orchestratr.sqlite3")``. ``options`` override URL
    parameters (see :class:`~orchestratr_sql.url.StorageOptions`)."""
    parsed = parse_url(url, options)
    connector, dialect = make_connector(parsed)
    return SqlStorage(connector, dialect)


def build_storage(
    spec: BackendSpec, plugin: str, default_url: str | None = None
) -> SqlStorage | None:
    """The body of each plugin module's ``orchestratr_make_storage`` hook: a
    storage for ``spec`` if it names ``plugin``, else ``None``."""
    if spec.plugin != plugin:
        return None
    url = spec.url or default_url
    if url is None:
        raise ConfigurationError(f"the {plugin} storage needs a URL, e.g. {_EXAMPLES[plugin]}")
    parsed = parse_url(url, spec.options)
    if parsed.dialect != plugin:
        raise ConfigurationError(
            f"storage plugin {plugin!r} cannot use the URL {parsed.masked!r} "
            f"(that is a {parsed.dialect} URL)"
        )
    connector, dialect = make_connector(parsed)
    return SqlStorage(connector, dialect)


_EXAMPLES = {
    "sqlite": DEFAULT_SQLITE_URL,
    "postgresql": "postgresql://user:password@host:5432/dbname",
    "mysql": "mysql://user:password@host:3306/dbname",
    "sqlserver": "mssql://user:password@host:1433/dbname?driver=ODBC+Driver+18+for+SQL+Server",
}
