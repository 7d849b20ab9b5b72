"""Storage conformance, what managers share: the outbox, leases and the cancelled-job set."""

from __future__ import annotations

import asyncio

import pytest

from orchestratr_core.job import JobEvent, JobStatus, new_id
from orchestratr_core.storage import OutboxKind, Storage
from orchestratr_core.testing.storage_suite._common import (
    HOLDER,
    LEASE,
    OTHER,
    _all_outbox,
    _create,
    _get,
    _ids,
    _in_status,
    _must,
    _new_job,
    _now,
    _sec,
)

__all__ = ["CancelledJobIdsTests", "GenerationRaiseTests", "LeaseTests", "OutboxTests"]


class OutboxTests:
    """The outbox."""

    async def test_claim_outbox_skips_live_claims_and_takes_expired_ones(
        self, storage: Storage
    ) -> None:
        now = _now()
        live = await _create(storage, at=now, lease=_sec(60))
        expired = await _create(storage, at=now, lease=-_sec(1))
        items = await storage.claim_outbox(OTHER, now, now + _sec(30), 10)
        assert [item.job_id for item in items] == [expired.id]
        # Now OTHER holds it: nobody else takes it until OTHER's lease ends.
        assert await storage.claim_outbox(HOLDER, now + _sec(1), now + _sec(30), 10) == []
        taken = await storage.claim_outbox(HOLDER, now + _sec(31), now + _sec(120), 10)
        assert [item.job_id for item in taken] == [expired.id]
        late = await storage.claim_outbox(OTHER, now + _sec(61), now + _sec(90), 10)
        assert [item.job_id for item in late] == [live.id]

    async def test_claim_outbox_takes_the_oldest_rows_first_up_to_the_limit(
        self, storage: Storage
    ) -> None:
        now = _now()
        jobs = [await _create(storage, at=now + _sec(i), lease=-_sec(100)) for i in range(5)]
        first = await storage.claim_outbox(OTHER, now + _sec(10), now + _sec(60), 2)
        assert [item.job_id for item in first] == _ids(jobs[:2])
        assert first[0].id < first[1].id
        rest = await storage.claim_outbox(OTHER, now + _sec(10), now + _sec(60), 10)
        assert [item.job_id for item in rest] == _ids(jobs[2:])

    async def test_concurrent_claimers_never_get_the_same_row(self, storage: Storage) -> None:
        now = _now()
        jobs = [await _create(storage, at=now, lease=-_sec(1)) for _ in range(40)]
        batches = await asyncio.gather(
            *(storage.claim_outbox(f"m{i}", now, now + LEASE, 15) for i in range(4))
        )
        claimed = [item.id for batch in batches for item in batch]
        assert len(claimed) == len(set(claimed)) == 40
        assert sorted(item.job_id for batch in batches for item in batch) == sorted(_ids(jobs))

    async def test_complete_outbox_deletes_the_rows(self, storage: Storage) -> None:
        now = _now()
        for _ in range(3):
            await _create(storage, at=now, lease=-_sec(1))
        items = await storage.claim_outbox(HOLDER, now, now + LEASE, 10)
        await storage.complete_outbox([items[0].id, items[2].id])
        left = await _all_outbox(storage, now)
        assert [item.id for item in left] == [items[1].id]
        await storage.complete_outbox([])

    async def test_complete_outbox_for_job_deletes_only_the_holders_rows_of_that_kind(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _create(storage, at=now)
        other_job = await _create(storage, at=now)
        assert await storage.complete_outbox_for_job(job.id, OutboxKind.PUBLISH, OTHER) == 0
        assert await storage.complete_outbox_for_job(job.id, OutboxKind.CANCEL, HOLDER) == 0
        assert await storage.complete_outbox_for_job(job.id, OutboxKind.PUBLISH, HOLDER) == 1
        assert await storage.complete_outbox_for_job(job.id, OutboxKind.PUBLISH, HOLDER) == 0
        await storage.request_cancel(job.id, now, HOLDER, now + LEASE)
        assert await storage.complete_outbox_for_job(job.id, OutboxKind.CANCEL, HOLDER) == 1
        left = await _all_outbox(storage, now)
        assert [(item.job_id, item.kind) for item in left] == [(other_job.id, OutboxKind.PUBLISH)]

    async def test_complete_outbox_for_jobs_deletes_only_the_holders_rows_of_that_kind(
        self, storage: Storage
    ) -> None:
        now = _now()
        jobs = [await _create(storage, at=now) for _ in range(4)]
        other = await storage.create_job(_new_job(at=now), OTHER, now + LEASE)
        ids = [job.id for job in jobs[:3]] + [other.id, new_id()]
        assert await storage.complete_outbox_for_jobs(ids, OutboxKind.CANCEL, HOLDER) == 0
        assert await storage.complete_outbox_for_jobs([], OutboxKind.PUBLISH, HOLDER) == 0
        assert await storage.complete_outbox_for_jobs(ids, OutboxKind.PUBLISH, HOLDER) == 3
        assert await storage.complete_outbox_for_jobs(ids, OutboxKind.PUBLISH, HOLDER) == 0
        left = await _all_outbox(storage, now)
        assert sorted(item.job_id for item in left) == sorted([jobs[3].id, other.id])


class GenerationRaiseTests:
    """:meth:`Storage.raise_pending_generation`: the guarded new generation the
    outbox relay takes before it sends a job's message again."""

    async def test_it_raises_a_waiting_jobs_generation_once_and_changes_nothing_else(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _create(storage, at=now)
        other = await _create(storage, at=now)
        assert await _raise(storage, job.id, 1) is True
        after = await _get(storage, job.id)
        assert after.generation == 2
        assert (after.status, after.server_id, after.fence, after.name, after.argument) == (
            JobStatus.PENDING,
            None,
            0,
            job.name,
            job.argument,
        )
        # Judged on the generation read: a second raise from 1 is stale.
        assert await _raise(storage, job.id, 1) is False
        assert (await _get(storage, job.id)).generation == 2
        assert await _raise(storage, job.id, 2) is True
        assert (await _get(storage, job.id)).generation == 3
        assert (await _get(storage, other.id)).generation == 1
        assert await _raise(storage, new_id(), 1) is False  # an unknown job: nothing

    async def test_a_released_job_waits_again_and_may_be_raised(self, storage: Storage) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PENDING, now, fence=9)
        assert await _raise(storage, job.id, job.generation) is True
        after = await _get(storage, job.id)
        assert (after.generation, after.fence) == (job.generation + 1, 9)

    async def test_it_refuses_a_job_that_runs_is_held_or_is_cancelled(
        self, storage: Storage
    ) -> None:
        now = _now()
        for status in (
            JobStatus.PROCESSING,
            JobStatus.PAUSING,
            JobStatus.PAUSED,
            JobStatus.QUARANTINED,
            JobStatus.DELETING,
            JobStatus.DELETED,
            JobStatus.COMPLETED,
        ):
            job = await _in_status(storage, status, now)
            assert await _raise(storage, job.id, job.generation) is False, status
            after = await _get(storage, job.id)
            assert (after.status, after.generation) == (status, job.generation), status

    async def test_a_start_and_a_raise_racing_never_both_apply(self, storage: Storage) -> None:
        now = _now()
        job = await _create(storage, at=now)
        await _must(storage, job.id, JobEvent.START, "s1", 5, now)
        assert await _raise(storage, job.id, 1) is False
        assert (await _get(storage, job.id)).generation == 1

    async def test_of_two_managers_raising_at_once_one_wins(self, storage: Storage) -> None:
        job = await _create(storage, at=_now())
        won = await asyncio.gather(*(_raise(storage, job.id, 1) for _ in range(4)))
        assert sorted(won) == [False, False, False, True]
        assert (await _get(storage, job.id)).generation == 2


async def _raise(storage: Storage, job_id: str, generation: int) -> bool:
    """``raise_pending_generation``, or skip for a backend written before it."""
    try:
        return await storage.raise_pending_generation(job_id, generation)
    except NotImplementedError:
        pytest.skip(f"{type(storage).__name__} does not implement raise_pending_generation")


class LeaseTests:
    """Leases."""

    async def test_a_lease_is_held_renewed_and_taken_over_after_it_ends(
        self, storage: Storage
    ) -> None:
        now = _now()
        assert await storage.acquire_lease("leader", HOLDER, now, now + _sec(10))
        assert not await storage.acquire_lease("leader", OTHER, now + _sec(5), now + _sec(15))
        assert await storage.acquire_lease("leader", HOLDER, now + _sec(5), now + _sec(20))
        assert not await storage.acquire_lease("leader", OTHER, now + _sec(15), now + _sec(25))
        assert await storage.acquire_lease("leader", OTHER, now + _sec(21), now + _sec(31))
        assert not await storage.acquire_lease("leader", HOLDER, now + _sec(22), now + _sec(32))

    async def test_leases_of_different_names_are_independent(self, storage: Storage) -> None:
        now = _now()
        assert await storage.acquire_lease("a", HOLDER, now, now + LEASE)
        assert await storage.acquire_lease("b", OTHER, now, now + LEASE)

    async def test_of_managers_racing_for_a_lease_exactly_one_wins(self, storage: Storage) -> None:
        now = _now()
        results = await asyncio.gather(
            *(storage.acquire_lease("leader", f"m{i}", now, now + LEASE) for i in range(8))
        )
        assert results.count(True) == 1


class CancelledJobIdsTests:
    """``cancelled_job_ids``."""

    async def test_cancelled_job_ids_lists_deleting_and_recently_deleted_or_completed_jobs(
        self, storage: Storage
    ) -> None:
        now = _now()
        deleting = await _in_status(storage, JobStatus.DELETING, now)
        old_deleted = await _in_status(storage, JobStatus.DELETED, now)
        old_completed = await _in_status(storage, JobStatus.COMPLETED, now)
        recent = await _create(storage, at=now)
        await storage.request_cancel(recent.id, now, HOLDER, now + LEASE)
        await _must(storage, recent.id, JobEvent.CONFIRM_DELETED, None, 0, now + _sec(100))
        for status in (JobStatus.PENDING, JobStatus.PROCESSING):
            await _in_status(storage, status, now)
        ids = await storage.cancelled_job_ids(now + _sec(50))
        assert sorted(ids) == sorted([deleting.id, recent.id])
        everything = await storage.cancelled_job_ids(now - _sec(1))
        assert sorted(everything) == sorted(
            [deleting.id, recent.id, old_deleted.id, old_completed.id]
        )
