"""The database, not Python, decides races: uniqueness of names, transition
guards, outbox claims and leases hold under real concurrency, each contender on
its own connection (its own storage, as separate managers would be)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from orchestratr_core.errors import DuplicateJobName
from orchestratr_core.job import JobEvent, JobQuery, JobStatus, NewJob, new_id, utcnow
from orchestratr_sql import SqlStorage
from tests.support.sql import storage_from_url

CONTENDERS = 50
LEASE = timedelta(seconds=30)


@pytest.fixture
async def managers(store_url: str) -> AsyncIterator[Callable[[int], Awaitable[list[SqlStorage]]]]:
    """Open ``n`` independent storages (one connection each) on one store."""
    opened: list[SqlStorage] = []

    async def open_many(n: int) -> list[SqlStorage]:
        storages = [storage_from_url(store_url, pool_min=1, pool_max=1) for _ in range(n)]
        await asyncio.gather(*(s.open() for s in storages))
        opened.extend(storages)
        return storages

    yield open_many
    await asyncio.gather(*(s.close() for s in opened))


async def _new_job(storage: SqlStorage, name: str = "job") -> str:
    now = utcnow()
    job = await storage.create_job(
        NewJob(id=new_id(), name=name, argument="", created_at=now), "creator", now + LEASE
    )
    return job.id


async def _outcomes(calls: list[Awaitable[Any]]) -> list[Any]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


async def test_of_50_concurrent_creates_of_one_name_exactly_one_wins(managers: Any) -> None:
    storages = await managers(CONTENDERS)
    now = utcnow()
    results = await _outcomes(
        [
            s.create_job(
                NewJob(id=new_id(), name="the-one", argument=str(i), created_at=now),
                f"m{i}",
                now + LEASE,
            )
            for i, s in enumerate(storages)
        ]
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(e, DuplicateJobName) for e in losers), losers
    page = await storages[0].list_jobs(JobQuery(name_prefix="the-one", include_deleted=True))
    assert [job.id for job in page.items] == [winners[0].id]
    outbox = await storages[0].claim_outbox("checker", now + LEASE * 2, now + LEASE * 3, 100)
    assert [item.job_id for item in outbox] == [winners[0].id]


async def test_a_name_is_free_again_once_its_job_is_deleted_but_not_before(managers: Any) -> None:
    (storage,) = await managers(1)
    job_id = await _new_job(storage, "reused")
    now = utcnow()
    await storage.request_cancel(job_id, now, "m", now + LEASE)
    with pytest.raises(DuplicateJobName):
        await _new_job(storage, "reused")  # deleting still holds the name
    result = await storage.transition(
        job_id, JobEvent.CONFIRM_DELETED, server_id=None, fence=0, now=utcnow()
    )
    assert result.applied
    assert await _new_job(storage, "reused") != job_id
    assert await _new_job(storage, "Reused")  # names are case-sensitive


async def test_concurrent_starts_leave_the_newest_fence_as_owner(managers: Any) -> None:
    storages = await managers(20)
    job_id = await _new_job(storages[0])
    results = await _outcomes(
        [
            s.transition(job_id, JobEvent.START, server_id=f"s{i}", fence=i + 1, now=utcnow())
            for i, s in enumerate(storages)
        ]
    )
    assert not [r for r in results if isinstance(r, BaseException)], results
    job = await storages[0].get_job(job_id)
    assert job is not None
    assert (job.status, job.server_id, job.fence) == (JobStatus.PROCESSING, "s19", 20)
    for result in results:  # an applied start was the newest at its moment
        if result.applied:
            assert result.job.fence >= int(result.job.server_id[1:]) + 1


async def test_concurrent_completes_by_the_owner_apply_exactly_once(managers: Any) -> None:
    storages = await managers(20)
    job_id = await _new_job(storages[0])
    await storages[0].transition(job_id, JobEvent.START, server_id="s1", fence=7, now=utcnow())
    results = await _outcomes(
        [
            s.transition(job_id, JobEvent.COMPLETE, server_id="s1", fence=7, now=utcnow())
            for s in storages
        ]
    )
    assert sum(1 for r in results if r.applied) == 1, results
    assert all(r.job.status is JobStatus.COMPLETED for r in results)


async def test_a_cancel_racing_many_starts_is_final(managers: Any) -> None:
    storages = await managers(21)
    job_id = await _new_job(storages[0])
    now = utcnow()
    calls: list[Awaitable[Any]] = [
        s.transition(job_id, JobEvent.START, server_id=f"s{i}", fence=i + 1, now=utcnow())
        for i, s in enumerate(storages[1:])
    ]
    calls.insert(10, storages[0].request_cancel(job_id, now, "m", now + LEASE))
    results = await _outcomes(calls)
    assert not [r for r in results if isinstance(r, BaseException)], results
    job = await storages[0].get_job(job_id)
    assert job is not None and job.status is JobStatus.DELETING
    ids = await storages[0].cancelled_job_ids(now)
    assert ids == [job_id]


async def test_concurrent_claimers_never_claim_one_outbox_row_twice(managers: Any) -> None:
    storages = await managers(10)
    now = utcnow()
    for i in range(40):  # claims expire at once: every row is claimable
        await storages[0].create_job(
            NewJob(id=new_id(), name=f"job-{i}", argument="", created_at=now), "creator", now
        )
    later = now + timedelta(seconds=1)

    async def drain(storage: SqlStorage, holder: str) -> list[int]:
        got: list[int] = []
        while batch := await storage.claim_outbox(holder, later, later + LEASE, 3):
            got.extend(item.id for item in batch)
        return got

    claimed = await asyncio.gather(*(drain(s, f"m{i}") for i, s in enumerate(storages)))
    flat = [row for rows in claimed for row in rows]
    assert len(flat) == 40 and len(set(flat)) == 40


async def test_of_managers_racing_for_a_free_lease_exactly_one_wins(managers: Any) -> None:
    storages = await managers(20)
    now = utcnow()
    results = await _outcomes(
        [s.acquire_lease("reaper", f"m{i}", now, now + LEASE) for i, s in enumerate(storages)]
    )
    assert results.count(True) == 1, results
    winner = results.index(True)
    assert await storages[0].acquire_lease("reaper", f"m{winner}", utcnow(), utcnow() + LEASE)
