"""Behaviour that depends on each dialect's SQL: set-based heartbeat ingestion,
assignment order in multi-table updates, prefix filters and keyset paging."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest

from orchestratr_core.job import JobEvent, JobQuery, JobStatus, NewJob, new_id, utcnow
from orchestratr_core.protocol import ServerHeartbeat
from orchestratr_sql import SqlStorage
from orchestratr_sql.connection import Connection
from tests.support.sql import heartbeat, storage_from_url


@pytest.fixture
async def storage(store_url: str) -> AsyncIterator[SqlStorage]:
    opened = storage_from_url(store_url)
    await opened.open()
    yield opened
    await opened.close()


async def _jobs(storage: SqlStorage, names: list[str]) -> list[str]:
    now = utcnow()
    ids = []
    for name in names:
        job = await storage.create_job(
            NewJob(id=new_id(), name=name, argument="", created_at=now), "m", now
        )
        ids.append(job.id)
    return ids


class _Counting(Connection):
    """Counts the statements a storage sends (wraps the real connection)."""

    def __init__(self, inner: Connection, counter: list[int]) -> None:
        self.inner, self.counter, self.style = inner, counter, inner.style

    async def execute(self, query: Any, values: Any) -> int:
        self.counter[0] += 1
        return await self.inner.execute(query, values)

    async def fetch(self, query: Any, values: Any) -> list[Any]:
        self.counter[0] += 1
        return await self.inner.fetch(query, values)

    async def run_script_statement(self, sql: str) -> None:
        self.counter[0] += 1
        await self.inner.run_script_statement(sql)


async def _statements_of_heartbeat(storage: SqlStorage, heartbeat: ServerHeartbeat) -> int:
    counter = [0]
    original = storage.connector.transaction

    @asynccontextmanager
    async def counting(*, write: bool = True) -> AsyncIterator[Connection]:
        async with original(write=write) as conn:
            yield _Counting(conn, counter)

    storage.connector.transaction = counting  # type: ignore[method-assign]
    try:
        await storage.apply_heartbeat(heartbeat, utcnow())
    finally:
        del storage.connector.transaction
    return counter[0]


async def test_heartbeat_ingestion_takes_the_same_few_statements_for_3_or_300_jobs(
    storage: SqlStorage,
) -> None:
    few = await _jobs(storage, [f"few-{i}" for i in range(3)])
    many = await _jobs(storage, [f"many-{i}" for i in range(300)])
    small = await _statements_of_heartbeat(storage, heartbeat("s1", [(j, 1) for j in few]))
    large = await _statements_of_heartbeat(storage, heartbeat("s2", [(j, 1) for j in many]))
    # Five: the upsert, the starts, the refused ones, the release of the unlisted
    # jobs, and the read of those of them updated in place (they republish).
    assert small == large <= 5
    page = await storage.list_jobs(JobQuery(server_id="s2", limit=None))
    assert len(page.items) == 300
    assert all(job.status is JobStatus.PROCESSING for job in page.items)


async def test_a_heartbeat_taking_over_a_job_resets_started_at_only_on_a_new_owner(
    storage: SqlStorage,
) -> None:
    (job_id,) = await _jobs(storage, ["moving"])
    t1 = utcnow()
    await storage.transition(job_id, JobEvent.START, server_id="s1", fence=1, now=t1)
    t2 = t1 + timedelta(seconds=5)
    assert await storage.apply_heartbeat(heartbeat("s2", [(job_id, 2)]), t2) == []
    job = await storage.get_job(job_id)
    assert job is not None and (job.server_id, job.fence) == ("s2", 2)
    assert job.started_at is not None and abs(job.started_at - t2) < timedelta(milliseconds=1)
    t3 = t2 + timedelta(seconds=5)
    rejected = await storage.apply_heartbeat(heartbeat("s1", [(job_id, 1)]), t3)
    assert [j.id for j in rejected] == [job_id]  # the stale owner is told to stop
    await storage.apply_heartbeat(heartbeat("s2", [(job_id, 2)]), t3)
    again = await storage.get_job(job_id)
    assert again is not None and again.started_at == job.started_at


async def test_name_prefixes_are_literal_and_case_sensitive(storage: SqlStorage) -> None:
    names = ["a%b", "a%bc", "axb", "a_b", "A%b", "a!b", "a[b]", "é-1", "\U0001f680-rocket"]
    await _jobs(storage, names)

    async def names_for(prefix: str) -> list[str]:
        page = await storage.list_jobs(JobQuery(name_prefix=prefix, limit=None))
        return sorted(job.name for job in page.items)

    assert await names_for("a%") == ["a%b", "a%bc"]
    assert await names_for("a_") == ["a_b"]
    assert await names_for("A") == ["A%b"]
    assert await names_for("a!") == ["a!b"]
    assert await names_for("a[") == ["a[b]"]
    assert await names_for("é") == ["é-1"]
    assert await names_for("\U0001f680") == ["\U0001f680-rocket"]


async def test_keyset_pages_list_every_job_once_in_id_order(storage: SqlStorage) -> None:
    # Ids are time-ordered to the millisecond; within one they sort at random.
    ids = sorted(await _jobs(storage, [f"page-{i:03d}" for i in range(57)]))
    await storage.request_cancel(ids[3], utcnow(), "m", utcnow())
    seen: list[str] = []
    cursor = None
    while True:
        page = await storage.list_jobs(JobQuery(after=cursor, limit=10), with_total=True)
        assert page.total == 57
        seen.extend(job.id for job in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == ids
    pending = await storage.list_jobs(
        JobQuery(statuses=frozenset({JobStatus.PENDING}), offset=50, limit=10)
    )
    assert [job.id for job in pending.items] == [i for i in ids if i != ids[3]][50:]


async def test_a_failed_operation_leaves_nothing_behind(storage: SqlStorage) -> None:
    # One transaction per operation: a statement that fails after another one
    # succeeded rolls both back (on ODBC too, where cursors must not autocommit).
    now = utcnow()
    job_id = new_id()

    async def half_then_fail(conn: Connection) -> None:
        await conn.execute(
            storage._q["insert_job"],
            {
                "id": job_id,
                "name": "half",
                "argument": "",
                "generation": 1,
                "heartbeat_timeout": None,
                "now": storage.dialect.time_in(now),
                "job_kind": "default",
                "requires": "",
                "spread": None,
            },
        )
        await conn.execute(  # violates the outbox -> jobs foreign key
            storage._q["insert_outbox"],
            {
                "job_id": "no-such-job",
                "kind": "publish",
                "generation": 1,
                "now": storage.dialect.time_in(now),
                "holder": "m",
                "lease_until": storage.dialect.time_in(now),
            },
        )

    with pytest.raises(Exception, match=r"(?i)foreign|constraint"):
        await storage._run("half", half_then_fail)
    assert await storage.get_job(job_id) is None


async def test_an_in_memory_sqlite_store_keeps_its_data_on_one_shared_connection() -> None:
    storage = storage_from_url("sqlite:///:memory:", pool_max=8)
    await storage.open()
    try:
        (job_id,) = await _jobs(storage, ["in-memory"])
        assert (await storage.get_job(job_id)) is not None
        page = await storage.list_jobs(JobQuery(), with_total=True)
        assert page.total == 1
    finally:
        await storage.close()
