"""Storage conformance, creating jobs and requesting their cancellation."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from orchestratr_core.errors import DuplicateJobName, UnknownJob
from orchestratr_core.job import JobQuery, JobRecord, JobStatus, new_id
from orchestratr_core.storage import OutboxKind, Storage
from orchestratr_core.testing.storage_suite._common import (
    FAR,
    HOLDER,
    LEASE,
    OTHER,
    _all_outbox,
    _create,
    _create_many,
    _get,
    _ids,
    _in_status,
    _new_job,
    _now,
    _refused_batch,
    _same_time,
    _sec,
)

__all__ = ["CreateJobTests", "CreateJobsTests", "RequestCancelTests"]


class CreateJobTests:
    """``create_job``."""

    async def test_create_job_stores_a_pending_job_with_fence_zero(self, storage: Storage) -> None:
        now = _now()
        job = _new_job("feed-1", at=now, generation=3, argument="é" * 10)
        created = await storage.create_job(job, HOLDER, now + LEASE)
        assert created.id == job.id
        assert created.name == "feed-1"
        assert created.argument == "é" * 10
        assert created.status is JobStatus.PENDING
        assert created.server_id is None
        assert created.fence == 0
        assert created.generation == 3
        assert created.restarts == 0
        assert created.last_error is None
        assert created.started_at is None
        assert _same_time(created.created_at, now)
        assert _same_time(created.updated_at, now)
        assert await storage.get_job(job.id) == created
        assert created.heartbeat_timeout is None

    async def test_create_job_keeps_the_watchdog_timeout(self, storage: Storage) -> None:
        now = _now()
        job = dataclasses.replace(_new_job("watched", at=now), heartbeat_timeout=2.5)
        await storage.create_job(job, HOLDER, now + LEASE)
        stored = await _get(storage, job.id)
        assert stored.heartbeat_timeout == 2.5

    async def test_create_job_queues_a_publish_row_claimed_by_the_creator_until_its_lease(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await storage.create_job(_new_job(at=now, generation=2), HOLDER, now + LEASE)
        assert await storage.claim_outbox(OTHER, now + _sec(1), now + _sec(60), 10) == []
        assert await storage.claim_outbox(OTHER, now + LEASE - _sec(1), now + _sec(60), 10) == []
        items = await storage.claim_outbox(OTHER, now + LEASE + _sec(1), now + _sec(90), 10)
        assert len(items) == 1
        item = items[0]
        assert item.job_id == job.id
        assert item.kind is OutboxKind.PUBLISH
        assert item.generation == 2
        assert item.created_at.tzinfo is not None

    async def test_create_job_with_a_taken_name_raises_and_stores_nothing(
        self, storage: Storage
    ) -> None:
        now = _now()
        first = await _create(storage, "unique", at=now)
        with pytest.raises(DuplicateJobName) as caught:
            await _create(storage, "unique", at=now + _sec(1))
        assert caught.value.name == "unique"
        page = await storage.list_jobs(JobQuery(include_deleted=True), with_total=True)
        assert _ids(page.items) == [first.id]
        assert [item.job_id for item in await _all_outbox(storage, now)] == [first.id]

    async def test_concurrent_creates_of_one_name_have_exactly_one_winner(
        self, storage: Storage
    ) -> None:
        now = _now()
        jobs = [_new_job("contended", at=now) for _ in range(20)]
        results = await asyncio.gather(
            *(storage.create_job(job, HOLDER, now + LEASE) for job in jobs), return_exceptions=True
        )
        winners = [r for r in results if isinstance(r, JobRecord)]
        losers = [r for r in results if isinstance(r, DuplicateJobName)]
        assert len(winners) == 1, results
        assert len(losers) == 19, results
        stored = await storage.list_jobs(JobQuery(include_deleted=True, limit=None))
        assert _ids(stored.items) == [winners[0].id]
        assert [item.job_id for item in await _all_outbox(storage, now)] == [winners[0].id]

    async def test_names_are_compared_exactly(self, storage: Storage) -> None:
        # Case, accents and composition all count: a binary (code point) comparison,
        # whatever the database's default collation does.
        now = _now()
        names = ["Feed", "feed", "FEED", "café", "cafe", "cafe\u0301", "straße", "strasse"]
        for name in names:
            await _create(storage, name, at=now)
        page = await storage.list_jobs(JobQuery(limit=None))
        assert sorted(job.name for job in page.items) == sorted(names)

    async def test_name_of_a_completed_job_stays_taken(self, storage: Storage) -> None:
        now = _now()
        await _in_status(storage, JobStatus.COMPLETED, now, name="done")
        with pytest.raises(DuplicateJobName):
            await _create(storage, "done", at=now)

    async def test_name_of_a_job_being_cancelled_stays_taken(self, storage: Storage) -> None:
        now = _now()
        await _in_status(storage, JobStatus.DELETING, now, name="going")
        with pytest.raises(DuplicateJobName):
            await _create(storage, "going", at=now)

    async def test_name_of_a_deleted_job_can_be_reused(self, storage: Storage) -> None:
        now = _now()
        old = await _in_status(storage, JobStatus.DELETED, now, name="reborn")
        new = await _create(storage, "reborn", at=now + _sec(1))
        assert new.id != old.id
        assert new.status is JobStatus.PENDING
        assert (await _get(storage, old.id)).status is JobStatus.DELETED
        with pytest.raises(DuplicateJobName):
            await _create(storage, "reborn", at=now + _sec(2))
        page = await storage.list_jobs(JobQuery(name_prefix="reborn", include_deleted=True))
        assert sorted(_ids(page.items)) == sorted([old.id, new.id])


class CreateJobsTests:
    """``create_jobs`` (optional: skipped where the default NotImplementedError stays)."""

    async def test_create_jobs_stores_every_job_and_returns_them_in_order(
        self, storage: Storage
    ) -> None:
        now = _now()
        jobs = [_new_job(f"batch-{i:03d}", at=now, argument=f"arg-é-{i}") for i in range(5)]
        jobs[2] = dataclasses.replace(jobs[2], heartbeat_timeout=2.5, generation=3)
        # Ids out of their sort order: the result follows the input, not the ids.
        jobs = [jobs[3], jobs[0], jobs[4], jobs[2], jobs[1]]
        created = await _create_many(storage, jobs, now + LEASE)
        assert _ids(created) == [job.id for job in jobs]
        for job, record in zip(jobs, created, strict=True):
            assert (record.name, record.argument, record.generation) == (
                job.name,
                job.argument,
                job.generation,
            )
            assert record.status is JobStatus.PENDING
            assert (record.server_id, record.fence, record.restarts) == (None, 0, 0)
            assert record.heartbeat_timeout == job.heartbeat_timeout
            assert _same_time(record.created_at, now)
            assert _same_time(record.updated_at, now)
            assert await storage.get_job(job.id) == record

    async def test_create_jobs_queues_a_publish_row_per_job_claimed_until_the_lease(
        self, storage: Storage
    ) -> None:
        now = _now()
        jobs = [_new_job(at=now, generation=2) for _ in range(4)]
        await _create_many(storage, jobs, now + LEASE)
        assert await storage.claim_outbox(OTHER, now + LEASE - _sec(1), now + FAR, 10) == []
        items = await storage.claim_outbox(OTHER, now + LEASE + _sec(1), now + FAR, 10)
        assert sorted(item.job_id for item in items) == sorted(job.id for job in jobs)
        assert all(item.kind is OutboxKind.PUBLISH and item.generation == 2 for item in items)
        assert len({item.id for item in items}) == 4

    async def test_create_jobs_of_nothing_writes_nothing(self, storage: Storage) -> None:
        now = _now()
        assert await _create_many(storage, [], now + LEASE) == []
        assert (await storage.list_jobs(JobQuery(), with_total=True)).total == 0
        assert await _all_outbox(storage, now) == []

    async def test_create_jobs_with_a_taken_name_raises_and_stores_nothing(
        self, storage: Storage
    ) -> None:
        now = _now()
        first = await _create(storage, "taken", at=now)
        jobs = [_new_job("fresh-1", at=now), _new_job("taken", at=now), _new_job("fresh-2", at=now)]
        refused = await _refused_batch(
            storage, jobs, now + LEASE, "a batch with a taken name was accepted"
        )
        assert refused.name == "taken"
        page = await storage.list_jobs(JobQuery(include_deleted=True, limit=None))
        assert _ids(page.items) == [first.id]
        assert [item.job_id for item in await _all_outbox(storage, now)] == [first.id]

    async def test_create_jobs_with_a_name_twice_raises_and_stores_nothing(
        self, storage: Storage
    ) -> None:
        now = _now()
        jobs = [_new_job("twin", at=now), _new_job("other", at=now), _new_job("twin", at=now)]
        refused = await _refused_batch(
            storage, jobs, now + LEASE, "a batch naming one job twice was accepted"
        )
        assert refused.name == "twin"
        assert (await storage.list_jobs(JobQuery(include_deleted=True), with_total=True)).total == 0
        assert await _all_outbox(storage, now) == []

    async def test_create_jobs_is_all_or_nothing_across_a_large_batch(
        self, storage: Storage
    ) -> None:
        # Larger than one multi-row statement of any SQL dialect: the conflict in
        # the last rows must undo the statements before it.
        now = _now()
        await _create(storage, "big-1199", at=now)
        jobs = [_new_job(f"big-{i:04d}", at=now) for i in range(1200)]
        refused = await _refused_batch(
            storage, jobs, now + LEASE, "a batch with a taken name was accepted"
        )
        assert refused.name == "big-1199"
        assert (await storage.list_jobs(JobQuery(include_deleted=True), with_total=True)).total == 1
        assert len(await _all_outbox(storage, now)) == 1
        created = await _create_many(storage, jobs[:-1], now + LEASE)
        assert _ids(created) == [job.id for job in jobs[:-1]]
        assert (await storage.list_jobs(JobQuery(), with_total=True)).total == 1200
        # (the first job's row is still claimed by the audit above)
        assert sorted(i.job_id for i in await _all_outbox(storage, now)) == sorted(_ids(created))

    async def test_create_jobs_may_reuse_the_name_of_a_deleted_job(self, storage: Storage) -> None:
        now = _now()
        old = await _in_status(storage, JobStatus.DELETED, now, name="again")
        (new,) = await _create_many(storage, [_new_job("again", at=now)], now + LEASE)
        assert new.id != old.id and new.status is JobStatus.PENDING

    async def test_concurrent_batches_sharing_a_name_have_exactly_one_winner(
        self, storage: Storage
    ) -> None:
        now = _now()
        batches = [[_new_job(f"own-{i}", at=now), _new_job("shared", at=now)] for i in range(8)]
        try:
            results = await asyncio.gather(
                *(storage.create_jobs(batch, HOLDER, now + LEASE) for batch in batches),
                return_exceptions=True,
            )
        except NotImplementedError:  # pragma: no cover - gather collects it
            pytest.skip("create_jobs not implemented")
        if any(isinstance(r, NotImplementedError) for r in results):
            pytest.skip(f"{type(storage).__name__} does not implement the optional create_jobs")
        winners = [r for r in results if isinstance(r, list)]
        losers = [r for r in results if isinstance(r, DuplicateJobName)]
        assert len(winners) == 1 and len(losers) == 7, results
        assert all(loser.name == "shared" for loser in losers)
        page = await storage.list_jobs(JobQuery(include_deleted=True, limit=None))
        assert sorted(_ids(page.items)) == sorted(_ids(winners[0]))


class RequestCancelTests:
    """``request_cancel``."""

    async def test_request_cancel_of_an_unknown_job_raises_unknown_job(
        self, storage: Storage
    ) -> None:
        now = _now()
        missing = new_id()
        with pytest.raises(UnknownJob) as caught:
            await storage.request_cancel(missing, now, HOLDER, now + LEASE)
        assert caught.value.job_id == missing

    async def test_request_cancel_moves_a_pending_job_to_deleting_and_queues_a_cancel_row(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _create(storage, at=now, generation=4, lease=-_sec(1))
        publish = await storage.claim_outbox(HOLDER, now, now + _sec(5), 10)
        await storage.complete_outbox([item.id for item in publish])
        later = now + _sec(10)
        cancelled, changed = await storage.request_cancel(job.id, later, HOLDER, later + LEASE)
        assert changed
        assert cancelled.status is JobStatus.DELETING
        assert cancelled.server_id is None
        assert _same_time(cancelled.updated_at, later)
        assert await storage.get_job(job.id) == cancelled
        # The row is claimed by the cancelling manager until its lease ends.
        assert await storage.claim_outbox(OTHER, later + _sec(1), later + _sec(60), 10) == []
        items = await storage.claim_outbox(OTHER, later + LEASE + _sec(1), later + FAR, 10)
        assert [(i.job_id, i.kind, i.generation) for i in items] == [(job.id, OutboxKind.CANCEL, 4)]

    async def test_request_cancel_of_a_running_job_keeps_its_owner_and_fence(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=9)
        cancelled, changed = await storage.request_cancel(job.id, now, HOLDER, now + LEASE)
        assert changed
        assert cancelled.status is JobStatus.DELETING
        assert (cancelled.server_id, cancelled.fence) == ("s1", 9)

    async def test_request_cancel_is_idempotent_and_queues_one_cancel_row(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _create(storage, at=now)
        first, changed = await storage.request_cancel(job.id, now, HOLDER, now + LEASE)
        assert changed
        again, changed_again = await storage.request_cancel(
            job.id, now + _sec(5), HOLDER, now + LEASE
        )
        assert not changed_again
        assert again == first
        kinds = [item.kind for item in await _all_outbox(storage, now)]
        assert sorted(kinds) == [OutboxKind.CANCEL, OutboxKind.PUBLISH]

    async def test_concurrent_cancels_of_one_job_change_it_once(self, storage: Storage) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now)
        results = await asyncio.gather(
            *(storage.request_cancel(job.id, now, f"m{i}", now + LEASE) for i in range(10))
        )
        assert sum(1 for _, changed in results if changed) == 1
        assert all(record.status is JobStatus.DELETING for record, _ in results)
        kinds = [item.kind for item in await _all_outbox(storage, now)]
        assert kinds.count(OutboxKind.CANCEL) == 1

    @pytest.mark.parametrize("status", [JobStatus.DELETED, JobStatus.COMPLETED])
    async def test_request_cancel_of_a_final_job_changes_nothing(
        self, storage: Storage, status: JobStatus
    ) -> None:
        now = _now()
        job = await _in_status(storage, status, now)
        before = await _all_outbox(storage, now)
        await storage.complete_outbox([item.id for item in before])
        after, changed = await storage.request_cancel(job.id, now + _sec(1), HOLDER, now + LEASE)
        assert not changed
        assert after == job
        assert await _all_outbox(storage, now) == []
