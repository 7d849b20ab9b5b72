"""Allocation throughput: what each write costs in statements and round trips,
per dialect, against the real databases -- and that the shortcuts keep the
guarantees (atomic batches, conflicts still reported, no session state leaking
through the PostgreSQL pool)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest

from orchestratr_core.errors import DuplicateJobName
from orchestratr_core.job import JobQuery, JobStatus, NewJob, new_id, utcnow
from orchestratr_core.storage import HEARTBEAT_REFRESH_STEP, OutboxKind
from orchestratr_sql import SqlStorage
from orchestratr_sql.connection import Connection, Connector
from tests.support.sql import heartbeat, storage_from_url

STEP = timedelta(seconds=HEARTBEAT_REFRESH_STEP)


@pytest.fixture
async def storage(store_url: str) -> AsyncIterator[SqlStorage]:
    opened = storage_from_url(store_url)
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def pg_one(pg_run_url: str) -> AsyncIterator[SqlStorage]:
    """A PostgreSQL storage with a pool of exactly one connection, emptied."""
    opened = storage_from_url(pg_run_url, pool_min=1, pool_max=1, retry_initial=0.01)
    await opened.open()
    async with opened.connector.transaction() as conn:
        for table in ("outbox", "jobs", "servers", "leases"):
            await conn.run_script_statement(f"DELETE FROM {table}")
    yield opened
    await opened.close()


def _job(name: str | None = None) -> NewJob:
    return NewJob(
        id=new_id(), name=name or f"job-{new_id()[-12:]}", argument="{}", created_at=utcnow()
    )


# -- statements per operation (every dialect) ----------------------------------------------


class _Counting(Connection):
    """Counts the statements a storage sends (wraps the real connection)."""

    def __init__(self, inner: Connection, log: list[str]) -> None:
        self.inner, self.log, self.style = inner, log, inner.style

    async def execute(self, query: Any, values: Any) -> int:
        self.log.append(query.name)
        return await self.inner.execute(query, values)

    async def fetch(self, query: Any, values: Any) -> list[Any]:
        self.log.append(query.name)
        return await self.inner.fetch(query, values)

    async def run_script_statement(self, sql: str) -> None:
        self.log.append(sql)
        await self.inner.run_script_statement(sql)


@asynccontextmanager
async def _counted(storage: SqlStorage) -> AsyncIterator[dict[str, list[str]]]:
    """Record the statements sent per kind of scope: ``transaction`` or
    ``statement`` (one statement, autocommit where the driver allows)."""
    seen: dict[str, list[str]] = {"transaction": [], "statement": []}
    connector = storage.connector
    originals = {"transaction": connector.transaction, "statement": connector.statement}

    def wrap(kind: str) -> Any:
        @asynccontextmanager
        async def scope(*, write: bool = True) -> AsyncIterator[Connection]:
            seen[kind].append("<scope>")
            async with originals[kind](write=write) as conn:
                yield _Counting(conn, seen[kind])

        return scope

    connector.transaction = wrap("transaction")  # type: ignore[method-assign]
    connector.statement = wrap("statement")  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del connector.transaction
        del connector.statement


async def test_create_job_is_one_statement_on_postgresql_and_two_inserts_elsewhere(
    storage: SqlStorage,
) -> None:
    async with _counted(storage) as seen:
        created = await storage.create_job(_job("counted"), "m", utcnow())
    assert await storage.get_job(created.id) == created
    if storage.dialect.name == "postgresql":
        assert seen == {"transaction": [], "statement": ["<scope>", "create_job"]}
    elif storage.dialect.stored_as_sent:
        # no SELECT: the record is what was inserted
        assert seen == {
            "transaction": ["<scope>", "insert_job", "insert_outbox"],
            "statement": [],
        }


async def test_create_jobs_is_one_statement_on_postgresql_and_chunked_elsewhere(
    storage: SqlStorage,
) -> None:
    jobs = [_job(f"batch-{i}") for i in range(storage.dialect.insert_rows + 1)]
    async with _counted(storage) as seen:
        created = await storage.create_jobs(jobs, "m", utcnow())
    assert [job.id for job in created] == [job.id for job in jobs]
    if storage.dialect.name == "postgresql":
        # 5,001 rows: two statements of the one-statement create, in a transaction
        assert seen["transaction"] == ["<scope>", "create_jobs", "create_jobs"]
    else:
        rows = storage.dialect.insert_rows
        assert seen["transaction"] == [
            "<scope>",
            f"insert_job[{rows}]",
            "insert_outbox_for_jobs",
            "insert_job[1]",
            "insert_outbox_for_jobs",
        ]
    assert seen["statement"] == []
    page = await storage.list_jobs(JobQuery(limit=None), with_total=True)
    assert page.total == len(jobs)


async def test_a_batch_failing_in_a_later_chunk_leaves_nothing_behind(
    storage: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage.dialect, "insert_rows", 7)
    taken = await storage.create_job(_job("chunk-19"), "m", utcnow())
    jobs = [_job(f"chunk-{i}") for i in range(20)]
    with pytest.raises(DuplicateJobName) as caught:
        await storage.create_jobs(jobs, "m", utcnow())
    assert caught.value.name == "chunk-19"
    page = await storage.list_jobs(JobQuery(include_deleted=True, limit=None))
    assert [job.id for job in page.items] == [taken.id]
    claimed = await storage.claim_outbox("audit", utcnow() + STEP, utcnow() + 2 * STEP, 100)
    assert [item.job_id for item in claimed] == [taken.id]
    created = await storage.create_jobs(jobs[:-1], "m", utcnow())
    assert [job.id for job in created] == [job.id for job in jobs[:-1]]


async def test_a_batch_retried_after_a_lost_commit_acknowledgement_returns_its_own_rows(
    storage: SqlStorage,
) -> None:
    # As if the commit went through but its answer was lost and _run retried:
    # the second insert meets our own rows and returns them instead of failing.
    jobs = [_job(f"again-{i}") for i in range(3)]
    first = await storage.create_jobs(jobs, "m", utcnow())
    assert await storage.create_jobs(jobs, "m", utcnow()) == first


async def test_completing_many_outbox_rows_is_one_statement(storage: SqlStorage) -> None:
    jobs = await storage.create_jobs([_job() for _ in range(50)], "m", utcnow() + STEP)
    async with _counted(storage) as seen:
        deleted = await storage.complete_outbox_for_jobs(
            [job.id for job in jobs], OutboxKind.PUBLISH, "m"
        )
    assert deleted == 50
    assert _one_statement(storage, seen) == ["delete_outbox_for_jobs"]


async def test_count_running_by_server_is_one_query(storage: SqlStorage) -> None:
    jobs = await storage.create_jobs([_job() for _ in range(5)], "m", utcnow())
    await storage.apply_heartbeat(heartbeat("s1", [(job.id, 1) for job in jobs]), utcnow())
    async with _counted(storage) as seen:
        assert await storage.count_running_by_server() == {"s1": 5}
    assert _one_statement(storage, seen) == ["count_running_by_server"]


def _one_statement(storage: SqlStorage, seen: dict[str, list[str]]) -> list[str]:
    """The statements of an operation that ran in a ``statement`` scope: in
    autocommit, without a transaction, where the connector can (PostgreSQL,
    MySQL); in a transaction elsewhere (SQLite, ODBC)."""
    assert seen["statement"][:1] == ["<scope>"]
    if type(storage.connector).statement is not Connector.statement:
        assert seen["transaction"] == []
    return [name for name in seen["statement"] if name != "<scope>"]


# -- heartbeats: unchanged rows are not rewritten within the refresh step ------------------


async def test_a_heartbeat_rewrites_a_job_only_when_something_changes_or_the_step_passed(
    storage: SqlStorage,
) -> None:
    (job,) = await storage.create_jobs([_job("steady")], "m", utcnow())
    t0 = utcnow()
    await storage.apply_heartbeat(heartbeat("s1", [(job.id, 1)], beat=t0.timestamp()), t0)
    first = await storage.get_job(job.id)
    assert first is not None and first.updated_at is not None

    t1 = t0 + STEP / 3  # nothing changes but the beat: the row stays as it was
    beat1 = t1.timestamp()
    assert await storage.apply_heartbeat(heartbeat("s1", [(job.id, 1)], beat=beat1), t1) == []
    assert await storage.get_job(job.id) == first

    t2 = t1 + timedelta(seconds=1)  # restarts changed: written at once
    beat2 = t2.timestamp()
    assert (
        await storage.apply_heartbeat(heartbeat("s1", [(job.id, 1)], beat=beat2, restarts=1), t2)
        == []
    )
    second = await storage.get_job(job.id)
    assert second is not None and second.restarts == 1
    assert abs(second.updated_at - t2) < timedelta(milliseconds=1)

    t3 = t2 + STEP + timedelta(seconds=1)  # the stored beat is older than the step
    hb = heartbeat("s1", [(job.id, 1)], beat=t3.timestamp(), restarts=1)
    assert await storage.apply_heartbeat(hb, t3) == []
    third = await storage.get_job(job.id)
    assert third is not None and third.last_heartbeat is not None
    assert abs(third.last_heartbeat - t3) < timedelta(milliseconds=1)
    assert third.started_at == first.started_at


async def test_skipped_rows_are_neither_conflicts_nor_released(storage: SqlStorage) -> None:
    # The conflicts come from a read of the reported rows, not from the UPDATE's
    # row count: rows left untouched must not look refused, refused ones must.
    steady = await storage.create_jobs([_job(f"steady-{i}") for i in range(3)], "m", utcnow())
    (theirs,) = await storage.create_jobs([_job("theirs")], "m", utcnow())
    t0 = utcnow()
    mine = [(job.id, 1) for job in steady]
    await storage.apply_heartbeat(heartbeat("s1", mine), t0)
    await storage.apply_heartbeat(heartbeat("s2", [(theirs.id, 5)]), t0)
    t1 = t0 + timedelta(seconds=2)
    rejected = await storage.apply_heartbeat(heartbeat("s1", [*mine, (theirs.id, 1)]), t1)
    assert [job.id for job in rejected] == [theirs.id]
    page = await storage.list_jobs(JobQuery(server_id="s1", limit=None))
    assert sorted(job.id for job in page.items) == sorted(job.id for job in steady)
    assert all(job.status is JobStatus.PROCESSING for job in page.items)


# -- PostgreSQL: one round trip, no reset, no session state in the pool --------------------


@asynccontextmanager
async def _queries_on_the_pool(storage: SqlStorage) -> AsyncIterator[list[str]]:
    """Every query the single pooled connection sends (BEGIN, COMMIT and the
    pool's reset query included), as asyncpg's query logger sees them."""
    sent: list[str] = []
    pool = storage.connector._pool  # type: ignore[attr-defined]

    def record(logged: Any) -> None:
        sent.append(" ".join(str(logged.query).split()))

    async with pool.acquire() as raw:
        raw.add_query_logger(record)
    try:
        yield sent
    finally:
        await asyncio.sleep(0)  # loggers are called soon after each query
        async with pool.acquire() as raw:
            raw.remove_query_logger(record)


@pytest.mark.postgresql
async def test_postgres_create_job_is_one_round_trip_without_begin_commit_or_reset(
    pg_one: SqlStorage,
) -> None:
    await pg_one.create_job(_job(), "m", utcnow())  # warm-up: prepare, type introspection
    async with _queries_on_the_pool(pg_one) as sent:
        await pg_one.create_job(_job("one-trip"), "m", utcnow())
        await asyncio.sleep(0)
        snapshot = list(sent)
    assert len(snapshot) == 1, snapshot
    assert snapshot[0].startswith("WITH j AS ( INSERT INTO jobs")


@pytest.mark.postgresql
async def test_postgres_create_jobs_and_the_outbox_delete_are_one_query_each(
    pg_one: SqlStorage,
) -> None:
    await pg_one.create_jobs([_job() for _ in range(2)], "m", utcnow())  # warm-up
    await pg_one.complete_outbox_for_jobs([new_id()], OutboxKind.PUBLISH, "m")
    async with _queries_on_the_pool(pg_one) as sent:
        jobs = await pg_one.create_jobs([_job() for _ in range(100)], "m", utcnow())
        await pg_one.complete_outbox_for_jobs([j.id for j in jobs], OutboxKind.PUBLISH, "m")
        await asyncio.sleep(0)
        snapshot = list(sent)
    assert len(snapshot) == 2, snapshot
    assert snapshot[0].startswith("WITH b AS ( SELECT * FROM unnest(")
    assert snapshot[1].startswith("DELETE FROM outbox WHERE job_id = ANY(")


@pytest.mark.postgresql
async def test_postgres_a_start_carrying_delta_heartbeat_is_one_round_trip_with_its_read(
    pg_one: SqlStorage,
) -> None:
    # What a manager applies for every server while a fleet fills: a delta that
    # lists the jobs just started and reads them as they were. One statement, no
    # BEGIN/COMMIT; a delta that releases jobs is a transaction of its own.
    jobs = await pg_one.create_jobs([_job() for _ in range(4)], "m", utcnow())
    warm = dataclasses.replace(heartbeat("s1", [(jobs[0].id, 1)]), seq=2, base=1)
    await pg_one.read_and_apply_heartbeat(warm, utcnow(), [jobs[0].id])  # warm-up: prepare
    starts = dataclasses.replace(
        heartbeat("s1", [(job.id, 1) for job in jobs[1:3]]),
        seq=3,
        base=2,
        started=(jobs[1].id, jobs[2].id),
    )
    async with _queries_on_the_pool(pg_one) as sent:
        before, refused = await pg_one.read_and_apply_heartbeat(
            starts, utcnow(), list(starts.started)
        )
        await asyncio.sleep(0)
        snapshot = list(sent)
    assert len(snapshot) == 1, snapshot
    assert snapshot[0].startswith("WITH s AS ( INSERT INTO servers")
    assert sorted(job.id for job in before) == sorted(starts.started)
    assert all(job.status is JobStatus.PENDING for job in before) and refused == []
    page = await pg_one.list_jobs(JobQuery(server_id="s1", limit=None))
    assert sorted(job.id for job in page.items) == sorted(job.id for job in jobs[:3])
    releasing = dataclasses.replace(
        heartbeat("s1", [(jobs[3].id, 1)]), seq=4, base=3, gone=(jobs[0].id,), started=()
    )
    async with _queries_on_the_pool(pg_one) as sent:
        await pg_one.read_and_apply_heartbeat(releasing, utcnow(), [])
        await asyncio.sleep(0)
        snapshot = list(sent)
    assert snapshot[0] == "BEGIN;" and snapshot[-1] == "COMMIT;", snapshot
    released = await pg_one.get_job(jobs[0].id)
    assert released is not None and released.status is JobStatus.PENDING


@pytest.mark.postgresql
async def test_postgres_migration_session_is_its_own_connection_and_frees_its_lock(
    pg_one: SqlStorage, pg_run_url: str
) -> None:
    from orchestratr_sql.queries import load_queries

    queries = load_queries("postgresql", "numeric")
    lock = {"lock_name": f"orx-test-{new_id()}"}
    pool = pg_one.connector._pool  # type: ignore[attr-defined]
    pooled_pid = await pool.fetchval("SELECT pg_backend_pid()")
    with pytest.raises(RuntimeError, match="migration failed"):
        async with pg_one.connector.session() as conn:
            (row,) = await conn.fetch(conn.adhoc("pid", "SELECT pg_backend_pid() AS pid"), {})
            assert row["pid"] != pooled_pid  # not a pooled connection
            await conn.fetch(queries["migrate_lock"], lock)
            raise RuntimeError("migration failed")
    # The lock went with its connection, whatever the pool's reset does.
    other = storage_from_url(pg_run_url, pool_max=1)
    await other.open()
    try:
        opool = other.connector._pool  # type: ignore[attr-defined]
        sql = "SELECT pg_try_advisory_lock(hashtext($1))"
        assert await opool.fetchval(sql, lock["lock_name"]) is True
        await opool.fetchval("SELECT pg_advisory_unlock(hashtext($1))", lock["lock_name"])
        held = await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1", pooled_pid
        )
        assert held == 0
    finally:
        await other.close()


@pytest.mark.postgresql
async def test_postgres_a_connection_an_error_left_unusable_is_not_handed_out_again(
    pg_one: SqlStorage,
) -> None:
    # Without the reset query nothing probes a released connection any more, and
    # the pool hands out the last one released first: a connection left
    # mid-protocol (asyncpg's InternalClientError after a server restart) must be
    # closed, or every retry would get it back.
    import asyncpg

    pids: list[int] = []

    async def broken_once(conn: Connection) -> str:
        (row,) = await conn.fetch(conn.adhoc("pid", "SELECT pg_backend_pid() AS pid"), {})
        pids.append(int(row["pid"]))
        if len(pids) == 1:
            raise asyncpg.InternalClientError(
                "cannot switch to state 15; another operation (2) is in progress"
            )
        return "done"

    assert await pg_one._run("probe", broken_once, statement=True) == "done"
    assert len(pids) == 2 and pids[0] != pids[1]
