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

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from orchestratr_core.errors import BackendUnavailable, DuplicateJobName, UnknownJob
from orchestratr_core.job import (
    JobEvent,
    JobRecord,
    JobStatus,
    NewJob,
    ServerRecord,
    ServerStatus,
    TransitionResult,
)
from orchestratr_core.placement import Pool
from orchestratr_core.protocol import ServerHeartbeat
from orchestratr_core.storage import (
    REASON_CANCEL_REQUESTED,
    REASON_NOT_REPORTED,
    REASON_PAUSE_REQUESTED,
    REASON_RESUMED,
    REASON_SERVER_DEAD,
    REASON_SERVER_LEFT,
    REASON_UPDATE_FELL_BACK,
    REASON_UPDATE_REQUESTED,
    REASON_UPDATED,
    REASON_UPDATED_IN_PLACE,
    FailureCount,
    OutboxItem,
    OutboxKind,
    check_heartbeat,
    check_transition,
    heartbeat_gone,
)
from orchestratr_sql.base import join_list, split_list
from orchestratr_sql.connection import Connection
from orchestratr_sql.errors import backend_error
from orchestratr_sql.queries import multi_row_values, values_query
from orchestratr_sql.reads import SqlReads, job_listing_sql

__all__ = ["SqlStorage", "backend_error", "job_listing_sql"]

_TRANSITION_QUERY = {
    JobEvent.START: "transition_start",
    JobEvent.RELEASE: "transition_release",
    JobEvent.COMPLETE: "transition_complete",
    JobEvent.FAIL: "transition_fail",
    JobEvent.CANCEL: "transition_cancel",
    JobEvent.CONFIRM_DELETED: "transition_confirm_deleted",
    JobEvent.PAUSE: "transition_pause",
    JobEvent.CONFIRM_HELD: "transition_confirm_held",
    JobEvent.QUARANTINE: "transition_quarantine",
}
"""Which guarded UPDATE of common.sql implements which row of TRANSITIONS."""


class SqlStorage(SqlReads):
    """A manager's storage on a SQL database.

    Build one with :func:`~orchestratr_sql.factory.storage_from_url` (or through the
    plugin manager) and call :meth:`open` before use. Reads are in
    :class:`~orchestratr_sql.reads.SqlReads`, the transaction plumbing in
    :class:`~orchestratr_sql.base.SqlStorageBase`.
    """

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
                            "kinds": [job.kind for job in chunk],
                            "requires": [join_list(job.constraints) for job in chunk],
                            "spreads": [job.spread for job in chunk],
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
        return await self._request(
            "request_cancel",
            "transition_cancel",
            OutboxKind.CANCEL,
            job_id,
            now,
            holder,
            lease_until,
            REASON_CANCEL_REQUESTED,
        )

    async def request_pause(
        self, job_id: str, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool]:
        """Guarded ``PAUSE`` (or, for a job an update is stopping, calling off its
        restart: ``pause_updating``) plus a ``cancel`` outbox row (the stop set),
        in one transaction."""
        return await self._request(
            "request_pause",
            "transition_pause",
            OutboxKind.CANCEL,
            job_id,
            now,
            holder,
            lease_until,
            REASON_PAUSE_REQUESTED,
            fallback="pause_updating",
        )

    async def request_update(
        self, job_id: str, argument: str, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool]:
        """One guarded ``UPDATE`` (``request_update``), then the row and, for a job
        left ``pausing``, a ``cancel`` outbox row: one transaction."""
        values = {
            "id": job_id,
            "argument": argument,
            "now": self._t(now),
            "reason": REASON_UPDATE_REQUESTED,
        }

        async def update(conn: Connection) -> tuple[JobRecord, bool]:
            changed = await conn.execute(self._q["request_update"], values)
            row = await conn.fetch_one(self._q["select_job"], values)
            if row is None:
                raise UnknownJob(job_id)
            job = self._job(row)
            if changed and job.status is JobStatus.PAUSING:
                await self._insert_outbox(conn, job, OutboxKind.CANCEL, now, holder, lease_until)
            return job, changed > 0

        return await self._run("request_update", update)

    async def request_update_in_place(
        self, job_id: str, argument: str, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool] | None:
        """Read the job and its owner's server row, then one guarded ``UPDATE``
        (``request_update_in_place``: owner, fence and generation as read, the
        owner alive, no live server of an older version) and a ``cancel`` outbox
        row: one transaction. The owner's ``updatable`` kinds are checked as read:
        a server process announces the same ones for its whole life."""

        async def update(conn: Connection) -> tuple[JobRecord, bool] | None:
            row = await conn.fetch_one(self._q["select_job"], {"id": job_id})
            if row is None:
                raise UnknownJob(job_id)
            job = self._job(row)
            if job.status is not JobStatus.PROCESSING or job.server_id is None:
                return None
            owner = await conn.fetch_one(self._q["select_server"], {"id": job.server_id})
            if owner is None or owner.get("updatable") is None:
                return None
            if job.kind not in split_list(owner["updatable"]):
                return None
            values = {
                "id": job_id,
                "argument": argument,
                "now": self._t(now),
                "reason": REASON_UPDATED_IN_PLACE,
                "server_id": job.server_id,
                "fence": job.fence,
                "generation": job.generation,
            }
            if not await conn.execute(self._q["request_update_in_place"], values):
                return None
            row = await conn.fetch_one(self._q["select_job"], values)
            if row is None:  # pragma: no cover - we just updated it
                raise RuntimeError("updated job row is not visible")
            job = self._job(row)
            await self._insert_outbox(conn, job, OutboxKind.CANCEL, now, holder, lease_until)
            return job, True

        return await self._run("request_update_in_place", update)

    async def record_update_applied(
        self, job_id: str, server_id: str, fence: int, argument_version: int
    ) -> bool:
        """One guarded ``UPDATE`` (``record_update_applied``)."""
        check_transition(fence, None)
        values = {
            "id": job_id,
            "server_id": server_id,
            "fence": int(fence),
            "version": int(argument_version),
        }

        async def update(conn: Connection) -> bool:
            return bool(await conn.execute(self._q["record_update_applied"], values))

        return await self._run("record_update_applied", update, statement=True)

    async def unapplied_updates(self, updated_since: datetime) -> list[JobRecord]:
        """The unacknowledged updates in place, in one query."""

        async def read(conn: Connection) -> list[JobRecord]:
            rows = await conn.fetch(
                self._q["select_unapplied_updates"], {"since": self._t(updated_since)}
            )
            return [self._job(row) for row in rows]

        return await self._run("unapplied_updates", read, write=False, statement=True)

    async def fall_back_update(
        self, job_id: str, argument_version: int, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool]:
        """One guarded ``UPDATE`` (``fall_back_update``), the row and, if it
        applied, a ``cancel`` outbox row: one transaction."""
        values = {
            "id": job_id,
            "version": int(argument_version),
            "now": self._t(now),
            "reason": REASON_UPDATE_FELL_BACK,
        }

        async def update(conn: Connection) -> tuple[JobRecord, bool]:
            changed = await conn.execute(self._q["fall_back_update"], values)
            row = await conn.fetch_one(self._q["select_job"], values)
            if row is None:
                raise UnknownJob(job_id)
            job = self._job(row)
            if changed:
                await self._insert_outbox(conn, job, OutboxKind.CANCEL, now, holder, lease_until)
            return job, changed > 0

        return await self._run("fall_back_update", update)

    async def inplace_floors(self, updated_since: datetime) -> list[tuple[str, int]]:
        """``(id, inplace_floor)`` of the recently updated-in-place jobs, in one query."""

        async def read(conn: Connection) -> list[tuple[str, int]]:
            rows = await conn.fetch(
                self._q["select_inplace_floors"], {"since": self._t(updated_since)}
            )
            return [(str(row["id"]), int(row["inplace_floor"])) for row in rows]

        return await self._run("inplace_floors", read, write=False, statement=True)

    async def _release_in_place(
        self,
        conn: Connection,
        server_id: str,
        now: datetime,
        reason: str,
        *,
        keep: Sequence[str] = (),
        only: Sequence[str] | None = None,
    ) -> None:
        """The second half of a bulk release of ``server_id``'s jobs (whose
        statement leaves out the jobs updated in place under their generation):
        each such job (not in ``keep``; among ``only`` when given) becomes
        ``pending`` under a new generation, with an unclaimed ``publish`` row.

        Run *after* the bulk statement, in its transaction: a job updated in place
        by a transaction that committed before that statement reached it is left
        out by it and found here; one that commits later finds the job released
        (its guard fails). One statement when no job of the server was updated in
        place (the usual case), else two more per such job."""
        rows = await conn.fetch(self._q["select_inplace_releases"], {"server_id": server_id})
        kept = set(keep)
        wanted = None if only is None else set(only)
        for row in rows:
            job_id = str(row["id"])
            if job_id in kept or (wanted is not None and job_id not in wanted):
                continue
            values = {
                "id": job_id,
                "server_id": server_id,
                "generation": int(row["generation"]),
                "now": self._t(now),
                "reason": reason,
            }
            if await conn.execute(self._q["release_in_place"], values):
                await self._publish_released(conn, job_id, now)

    async def _publish_released(self, conn: Connection, job_id: str, now: datetime) -> JobRecord:
        """The unclaimed ``publish`` row of a job just made ``pending`` under a new
        generation (the relay sends it); returns the job."""
        row = await conn.fetch_one(self._q["select_job"], {"id": job_id})
        if row is None:  # pragma: no cover - we just updated it
            raise RuntimeError("updated job row is not visible")
        job = self._job(row)
        await self._insert_outbox(conn, job, OutboxKind.PUBLISH, now, "", now)
        return job

    async def update_floors(self, updated_since: datetime) -> list[tuple[str, int]]:
        """``(id, update_floor)`` of the recently updated live jobs, in one query."""

        async def read(conn: Connection) -> list[tuple[str, int]]:
            rows = await conn.fetch(
                self._q["select_update_floors"], {"since": self._t(updated_since)}
            )
            return [(str(row["id"]), int(row["update_floor"])) for row in rows]

        return await self._run("update_floors", read, write=False, statement=True)

    async def _insert_outbox(
        self,
        conn: Connection,
        job: JobRecord,
        kind: OutboxKind,
        now: datetime,
        holder: str,
        lease_until: datetime,
    ) -> None:
        await conn.execute(
            self._q["insert_outbox"],
            {
                "job_id": job.id,
                "kind": kind.value,
                "generation": job.generation,
                "now": self._t(now),
                "holder": holder,
                "lease_until": self._t(lease_until),
            },
        )

    async def raise_pending_generation(self, job_id: str, generation: int) -> bool:
        """One guarded ``UPDATE`` (see :meth:`Storage.raise_pending_generation`)."""
        values = {"id": job_id, "generation": int(generation)}

        async def bump(conn: Connection) -> bool:
            return bool(await conn.execute(self._q["raise_pending_generation"], values))

        return await self._run("raise_pending_generation", bump, statement=True)

    async def request_resume(
        self, job_id: str, now: datetime, holder: str, lease_until: datetime
    ) -> tuple[JobRecord, bool]:
        """Guarded ``RESUME`` (a new generation) plus its ``publish`` outbox row."""
        return await self._request(
            "request_resume",
            "transition_resume",
            OutboxKind.PUBLISH,
            job_id,
            now,
            holder,
            lease_until,
            REASON_RESUMED,
        )

    async def _request(
        self,
        what: str,
        query: str,
        kind: OutboxKind,
        job_id: str,
        now: datetime,
        holder: str,
        lease_until: datetime,
        reason: str,
        fallback: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """A client's guarded transition (or, if it did not apply, the guarded
        ``fallback`` update) and, if one applied, its outbox row of ``kind`` for
        the generation it left: one transaction."""
        values = {"id": job_id, "now": self._t(now), "reason": reason}

        async def request(conn: Connection) -> tuple[JobRecord, bool]:
            changed = await conn.execute(self._q[query], values)
            if not changed and fallback is not None:
                changed = await conn.execute(self._q[fallback], values)
            row = await conn.fetch_one(self._q["select_job"], values)
            if row is None:
                raise UnknownJob(job_id)
            job = self._job(row)
            if changed:
                await self._insert_outbox(conn, job, kind, now, holder, lease_until)
            return job, changed > 0

        return await self._run(what, request)

    async def save_checkpoints(
        self, server_id: str, checkpoints: Sequence[tuple[str, int, str]], now: datetime
    ) -> list[str]:
        """One guarded ``UPDATE`` per checkpoint (a heartbeat carries only the
        changed ones), in one transaction."""
        for _, fence, _ in checkpoints:
            check_transition(fence, None)

        async def save(conn: Connection) -> list[str]:
            saved = []
            for job_id, fence, checkpoint in checkpoints:
                values = {
                    "id": job_id,
                    "server_id": server_id,
                    "fence": int(fence),
                    "checkpoint": checkpoint,
                    "now": self._t(now),
                }
                if await conn.execute(self._q["save_checkpoint"], values):
                    saved.append(job_id)
            return saved

        if not checkpoints:
            return []
        return await self._run("save_checkpoints", save)

    async def held_jobs(self) -> list[tuple[str, int]]:
        """``(id, generation)`` of every held job, in one query."""

        async def read(conn: Connection) -> list[tuple[str, int]]:
            rows = await conn.fetch(self._q["select_held_jobs"], {})
            return [(str(row["id"]), int(row["generation"])) for row in rows]

        return await self._run("held_jobs", read, write=False, statement=True)

    async def record_failure(
        self,
        job_id: str,
        *,
        seq: int,
        failure_log: str,
        now: datetime,
        quarantine: str | None = None,
    ) -> TransitionResult:
        """One compare-and-set ``UPDATE`` (``record_failure``), then the row."""
        values = {
            "id": job_id,
            "seq": int(seq),
            "failure_log": failure_log,
            "quarantine": quarantine,
            "quarantined": 0 if quarantine is None else 1,
            "now": self._t(now),
        }

        async def record(conn: Connection) -> TransitionResult:
            changed = await conn.execute(self._q["record_failure"], values)
            row = await conn.fetch_one(self._q["select_job"], values)
            return TransitionResult(
                applied=changed > 0, job=None if row is None else self._job(row)
            )

        return await self._run("record_failure", record)

    async def record_failures(self, counts: Sequence[FailureCount], now: datetime) -> list[str]:
        """The owner deaths of a dead server, one transaction per
        :data:`_FAILURE_CHUNK` jobs: PostgreSQL ``record_failures`` (one
        statement, parallel arrays, ``RETURNING`` the ids that applied); elsewhere
        the ``record_failure`` compare-and-set per job in that transaction."""
        applied: list[str] = []
        counts = list(counts)
        batched = "record_failures" in self._q
        for start in range(0, len(counts), _FAILURE_CHUNK):
            chunk = counts[start : start + _FAILURE_CHUNK]

            async def record(conn: Connection, chunk: list[FailureCount] = chunk) -> list[str]:
                if batched:
                    arrays = {
                        "ids": [c.job_id for c in chunk],
                        "seqs": [int(c.seq) for c in chunk],
                        "logs": [c.failure_log for c in chunk],
                        "quarantines": [c.quarantine for c in chunk],
                        "now": self._t(now),
                    }
                    rows = await conn.fetch(self._q["record_failures"], arrays)
                    return [str(row["id"]) for row in rows]
                done = []
                for c in chunk:
                    values = {
                        "id": c.job_id,
                        "seq": int(c.seq),
                        "failure_log": c.failure_log,
                        "quarantine": c.quarantine,
                        "quarantined": 0 if c.quarantine is None else 1,
                        "now": self._t(now),
                    }
                    if await conn.execute(self._q["record_failure"], values):
                        done.append(c.job_id)
                return done

            applied += await self._run("record_failures", record, statement=batched)
        return applied

    async def set_restart_budget(
        self, job_id: str, max_restarts: int | None, restart_window: float | None
    ) -> None:
        """Record a job's restart budget (right after creating it)."""
        values = {"id": job_id, "max_restarts": max_restarts, "restart_window": restart_window}

        async def update(conn: Connection) -> None:
            await conn.execute(self._q["set_restart_budget"], values)

        await self._run("set_restart_budget", update, statement=True)

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
            raise ValueError(
                f"{event.value} is applied by expire_servers/server_left/request_resume"
            )
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
            if event is JobEvent.CONFIRM_HELD:
                # A job an update stopped restarts with the new argument, in this
                # transaction (never lost): pending, a new generation, its message.
                update = {**values, "reason": REASON_UPDATED}
                if await conn.execute(self._q["transition_confirm_update"], update):
                    job = await self._publish_released(conn, job_id, now)
                    return TransitionResult(applied=True, job=job)
            elif event is JobEvent.RELEASE and await conn.execute(
                self._q["transition_release_in_place"], values
            ):
                # Updated in place: its message carries the old argument (a drop
                # mark drops it); republished under a new generation with the new.
                job = await self._publish_released(conn, job_id, now)
                return TransitionResult(applied=True, job=job)
            changed = await conn.execute(self._q[name], values)
            row = await conn.fetch_one(self._q["select_job"], values)
            return TransitionResult(
                applied=changed > 0, job=None if row is None else self._job(row)
            )

        return await self._run(f"transition {event.value}", apply)

    async def apply_heartbeat(self, heartbeat: ServerHeartbeat, now: datetime) -> list[JobRecord]:
        """Five statements whatever the number of jobs: upsert the server, apply
        ``START`` to every reported job (one set-based UPDATE), read back the
        reports that did not apply, release the jobs the server no longer runs
        (those it does not list, or -- a heartbeat of what changed -- those it
        says are gone; none: no statement) and read those of them updated in
        place (:meth:`_release_in_place`: two more statements per such job).
        PostgreSQL makes the first three one statement (``heartbeat_starts``), so
        a heartbeat of what changed that names no job gone is one round trip."""
        return (await self._ingest(heartbeat, now, ()))[1]

    async def read_and_apply_heartbeat(
        self, heartbeat: ServerHeartbeat, now: datetime, read: Sequence[str]
    ) -> tuple[list[JobRecord], list[JobRecord]]:
        """On PostgreSQL the read of the jobs as they were is part of the
        heartbeat's first statement (``heartbeat_starts``, :meth:`apply_heartbeat`);
        elsewhere it is a query of its own before the heartbeat."""
        if not read or not self._one_statement_heartbeats:
            return await super().read_and_apply_heartbeat(heartbeat, now, read)
        return await self._ingest(heartbeat, now, read)

    @property
    def _one_statement_heartbeats(self) -> bool:
        return "heartbeat_starts" in self._q

    async def _ingest(
        self, heartbeat: ServerHeartbeat, now: datetime, read: Sequence[str]
    ) -> tuple[list[JobRecord], list[JobRecord]]:
        """:meth:`apply_heartbeat`, and ``read`` as it was before it (only where
        :attr:`_one_statement_heartbeats`; else ``read`` must be empty)."""
        check_heartbeat(heartbeat)  # JSON_TABLE / json_each would not refuse a huge fence
        values = self._server_row(heartbeat, now)
        values["reason"] = REASON_NOT_REPORTED
        values.update(self.dialect.heartbeat_batch(heartbeat.jobs, now))
        one_statement = self._one_statement_heartbeats
        if one_statement:
            values["read"] = list(dict.fromkeys(read))
        elif read:
            raise ValueError("this dialect reads the jobs before a heartbeat by get_jobs")
        gone = heartbeat_gone(heartbeat)
        if gone is not None:
            values["gone"] = self.dialect.id_list(gone)

        async def ingest(conn: Connection) -> tuple[list[JobRecord], list[JobRecord]]:
            before: list[JobRecord] = []
            rejected: list[JobRecord] = []
            if one_statement:
                for row in await conn.fetch(self._q["heartbeat_starts"], values):
                    (before if row["part"] == "b" else rejected).append(self._job(row))
                rejected.sort(key=lambda job: job.id)
            else:
                await conn.execute(self._q["upsert_server"], values)
                if heartbeat.jobs:
                    await conn.execute(self._q["heartbeat_start_jobs"], values)
                    rows = await conn.fetch(self._q["heartbeat_rejected_jobs"], values)
                    rejected = [self._job(row) for row in rows]
            if gone is None:
                await conn.execute(self._q["heartbeat_release_unreported"], values)
                await self._release_in_place(
                    conn,
                    heartbeat.server_id,
                    now,
                    REASON_NOT_REPORTED,
                    keep=[job.job_id for job in heartbeat.jobs],
                )
            elif gone:
                await conn.execute(self._q["heartbeat_release_gone"], values)
                await self._release_in_place(
                    conn, heartbeat.server_id, now, REASON_NOT_REPORTED, only=gone
                )
            return before, rejected

        # A delta naming nothing gone is the one statement alone: no BEGIN/COMMIT.
        alone = one_statement and gone is not None and not gone
        return await self._run("apply_heartbeat", ingest, statement=alone)

    def _server_row(self, heartbeat: ServerHeartbeat, now: datetime) -> dict[str, Any]:
        """The parameters of ``upsert_server`` for one heartbeat."""
        return {
            "id": heartbeat.server_id,
            "server_id": heartbeat.server_id,
            "name": heartbeat.name,
            "max_workers": int(heartbeat.max_workers),
            "host": heartbeat.host,
            "pid": int(heartbeat.pid),
            "status": (ServerStatus.DRAINING if heartbeat.draining else ServerStatus.ALIVE).value,
            "started_at": self._t(datetime.fromtimestamp(heartbeat.started_at, UTC)),
            "now": self._t(now),
            "kinds": join_list(heartbeat.runs_kinds),
            "labels": join_list(sorted(heartbeat.labels)),
            "updatable": join_list(sorted(heartbeat.updatable)) if heartbeat.drops else None,
        }

    async def touch_servers(self, heartbeats: Sequence[tuple[ServerHeartbeat, datetime]]) -> None:
        """The server rows of heartbeats that list no job, in one transaction: one
        ``upsert_servers`` statement (PostgreSQL: parallel arrays, one row per
        server, the latest heartbeat of each), else ``upsert_server`` per
        heartbeat."""
        latest: dict[str, dict[str, Any]] = {}
        for heartbeat, now in heartbeats:
            if heartbeat.jobs or heartbeat.gone or not heartbeat.base:
                raise ValueError("touch_servers takes heartbeats that list no job")
            check_heartbeat(heartbeat)
            latest.pop(heartbeat.server_id, None)  # kept in the order they came
            latest[heartbeat.server_id] = self._server_row(heartbeat, now)
        if not latest:
            return
        rows = list(latest.values())
        batched = "upsert_servers" in self._q

        async def touch(conn: Connection) -> None:
            if batched:
                columns = {
                    array: [row[key] for row in rows] for array, key in _SERVER_ARRAYS.items()
                }
                await conn.execute(self._q["upsert_servers"], columns)
                return
            for row in rows:
                await conn.execute(self._q["upsert_server"], row)

        await self._run("touch_servers", touch, statement=batched)

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
                await self._release_in_place(conn, server_id, now, REASON_SERVER_DEAD)
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
            await self._release_in_place(conn, server_id, now, REASON_SERVER_LEFT)
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

    async def set_server_status(self, server_id: str, status: ServerStatus, now: datetime) -> bool:
        """Set a server's status; False for an unknown server."""
        values = {"id": server_id, "status": ServerStatus(status).value}

        async def update(conn: Connection) -> bool:
            return await conn.execute(self._q["set_server_status"], values) > 0

        return await self._run("set_server_status", update, statement=True)

    async def set_pending_reason(self, pool: Pool, reason: str | None) -> int:
        """Set the reason of the pool's pending jobs whose reason differs: one
        ``UPDATE`` (nothing is written when it is unchanged)."""
        values: dict[str, Any] = {"kind": pool.kind, "requires": join_list(pool.constraints)}
        name = "clear_pending_reason" if reason is None else "set_pending_reason"
        if reason is not None:
            values["reason"] = reason

        async def update(conn: Connection) -> int:
            return await conn.execute(self._q[name], values)

        return await self._run("set_pending_reason", update, statement=True)


_SERVER_ARRAYS = {
    "ids": "id",
    "names": "name",
    "max_workers": "max_workers",
    "hosts": "host",
    "pids": "pid",
    "statuses": "status",
    "started": "started_at",
    "seen": "now",
    "kinds": "kinds",
    "labels": "labels",
    "updatables": "updatable",
}
"""``upsert_servers`` array parameter -> the ``upsert_server`` parameter it lists."""


class _LeaseTaken(Exception):
    """A concurrent manager inserted the lease row first."""


class _BatchConflict(Exception):
    """A batch insert hit the unique name index (which name is looked up after)."""


_FAILURE_CHUNK = 2000
"""Jobs per transaction of :meth:`SqlStorage.record_failures`."""

_DELETE_CHUNK = 5000
"""Ids per outbox ``DELETE`` of :meth:`SqlStorage.complete_outbox_for_jobs`."""
