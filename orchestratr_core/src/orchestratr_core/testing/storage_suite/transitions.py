"""Storage conformance, the job state machine, row by row."""

from __future__ import annotations

import asyncio
import random

import pytest

from orchestratr_core.job import TRANSITIONS, JobEvent, JobStatus, TransitionResult, new_id
from orchestratr_core.protocol import RunningJob
from orchestratr_core.storage import Storage
from orchestratr_core.testing.storage_suite._common import (
    _CLIENT_EVENTS,
    HOLDER,
    LEASE,
    _apply,
    _create,
    _get,
    _heartbeat,
    _ids,
    _in_status,
    _job,
    _now,
    _same_time,
    _sec,
)

__all__ = ["TransitionTests"]


class TransitionTests:
    """``transition``: the state machine, row by row."""

    @pytest.mark.parametrize("status", list(JobStatus))
    @pytest.mark.parametrize("event", _CLIENT_EVENTS)
    async def test_transition_follows_the_state_machine_table(
        self, storage: Storage, event: JobEvent, status: JobStatus
    ) -> None:
        now = _now()
        before = await _in_status(storage, status, now, server="s1", fence=7)
        later = now + _sec(5)
        result = await _apply(storage, before.id, event, "s1", 7, later, reason="table test")
        rule = TRANSITIONS[event]
        after = _job(result)
        assert await storage.get_job(before.id) == after
        if status not in rule.sources:
            assert not result.applied
            assert after == before
            return
        assert result.applied
        if event is JobEvent.CONFIRM_HELD and status is JobStatus.PAUSING:
            assert after.status is JobStatus.PAUSED
        else:
            assert after.status is (rule.target if rule.target is not None else status)
        assert after.fence == 7
        assert _same_time(after.updated_at, later)
        if event is JobEvent.CONFIRM_HELD and status is JobStatus.QUARANTINED:
            assert after.reason == before.reason  # a quarantine keeps its reason
        else:
            assert after.reason == "table test"
        if rule.clears_owner:
            assert after.server_id is None
        elif rule.sets_owner:
            assert after.server_id == "s1"
            assert _same_time(after.last_heartbeat, later)
        else:
            assert after.server_id == before.server_id

    async def test_transition_of_an_unknown_job_reports_no_job(self, storage: Storage) -> None:
        result = await _apply(storage, new_id(), JobEvent.START, "s1", 1, _now())
        assert result == TransitionResult(applied=False, job=None)

    async def test_start_takes_a_pending_job_and_records_owner_fence_and_times(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _create(storage, at=now)
        later = now + _sec(3)
        result = await _apply(storage, job.id, JobEvent.START, "s1", 5, later, restarts=2)
        started = _job(result)
        assert result.applied
        assert started.status is JobStatus.PROCESSING
        assert (started.server_id, started.fence, started.restarts) == ("s1", 5, 2)
        assert _same_time(started.started_at, later)
        assert _same_time(started.last_heartbeat, later)
        assert _same_time(started.updated_at, later)
        assert _same_time(started.created_at, now)

    async def test_start_without_restarts_keeps_the_recorded_restarts(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _create(storage, at=now)
        await _apply(storage, job.id, JobEvent.START, "s1", 5, now, restarts=3)
        again = _job(await _apply(storage, job.id, JobEvent.START, "s1", 5, now + _sec(1)))
        assert again.restarts == 3

    async def test_repeated_start_by_the_owner_keeps_started_at_and_refreshes_heartbeat(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=5)
        later = now + _sec(30)
        result = await _apply(storage, job.id, JobEvent.START, "s1", 5, later)
        assert result.applied
        assert _same_time(_job(result).started_at, now)
        assert _same_time(_job(result).last_heartbeat, later)

    async def test_start_with_a_newer_fence_takes_the_job_over(self, storage: Storage) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=5)
        later = now + _sec(10)
        result = await _apply(storage, job.id, JobEvent.START, "s2", 6, later)
        assert result.applied
        assert (_job(result).server_id, _job(result).fence) == ("s2", 6)
        assert _same_time(_job(result).started_at, later)

    async def test_start_with_a_stale_fence_is_refused(self, storage: Storage) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=10)
        for server in ("s1", "s2"):
            result = await _apply(storage, job.id, JobEvent.START, server, 9, now + _sec(1))
            assert not result.applied
            assert result.job == job

    async def test_start_with_an_equal_fence_from_another_server_is_refused(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=10)
        result = await _apply(storage, job.id, JobEvent.START, "s2", 10, now + _sec(1))
        assert not result.applied
        assert result.job == job

    async def test_start_with_an_equal_fence_wins_when_nobody_owns_the_job(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PENDING, now, server="s1", fence=10)
        assert (job.server_id, job.fence) == (None, 10)
        result = await _apply(storage, job.id, JobEvent.START, "s2", 10, now + _sec(1))
        assert result.applied
        assert (_job(result).server_id, _job(result).fence) == ("s2", 10)

    async def test_start_below_the_kept_fence_of_a_released_job_is_refused(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PENDING, now, server="s1", fence=10)
        result = await _apply(storage, job.id, JobEvent.START, "s2", 9, now + _sec(1))
        assert not result.applied
        assert result.job == job

    @pytest.mark.parametrize("status", [JobStatus.DELETED, JobStatus.COMPLETED])
    async def test_a_final_job_never_returns_to_processing(
        self, storage: Storage, status: JobStatus
    ) -> None:
        # Defect 7 of the original: any "started" report revived even a deleted job.
        now = _now()
        job = await _in_status(storage, status, now, server="s1", fence=7)
        for server, fence in (("s1", 7), ("s1", 8), ("s2", 2**40)):
            result = await _apply(storage, job.id, JobEvent.START, server, fence, now + _sec(1))
            assert not result.applied
            assert result.job == job
        refused = await storage.apply_heartbeat(
            _heartbeat("s1", [RunningJob(job.id, 2**41)], at=now + _sec(2)), now + _sec(2)
        )
        assert _ids(refused) == [job.id]
        assert await storage.get_job(job.id) == job

    async def test_a_job_being_cancelled_is_not_restarted(self, storage: Storage) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.DELETING, now, server="s1", fence=7)
        result = await _apply(storage, job.id, JobEvent.START, "s2", 100, now + _sec(1))
        assert not result.applied
        assert result.job == job

    async def test_release_by_the_owner_makes_the_job_pending_and_keeps_the_fence(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        result = await _apply(storage, job.id, JobEvent.RELEASE, "s1", 7, now, reason="drain")
        released = _job(result)
        assert result.applied
        assert released.status is JobStatus.PENDING
        assert (released.server_id, released.fence, released.reason) == (None, 7, "drain")

    @pytest.mark.parametrize("event", [JobEvent.RELEASE, JobEvent.FAIL])
    async def test_owner_only_events_from_a_stale_owner_are_refused(
        self, storage: Storage, event: JobEvent
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        for server, fence in (("s1", 6), ("s1", 8), ("s2", 7), (None, 7)):
            result = await _apply(storage, job.id, event, server, fence, now + _sec(1))
            assert not result.applied, (server, fence)
            assert result.job == job

    async def test_fail_records_the_error_and_restarts_and_keeps_the_job_running(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        later = now + _sec(4)
        result = await _apply(
            storage, job.id, JobEvent.FAIL, "s1", 7, later, error="ValueError: boom", restarts=3
        )
        failed = _job(result)
        assert result.applied
        assert failed.status is JobStatus.PROCESSING
        assert (failed.server_id, failed.fence) == ("s1", 7)
        assert (failed.last_error, failed.restarts) == ("ValueError: boom", 3)
        assert _same_time(failed.updated_at, later)
        assert _same_time(failed.started_at, job.started_at)

    async def test_complete_by_the_owner_is_final_and_clears_the_owner(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        result = await _apply(storage, job.id, JobEvent.COMPLETE, "s1", 7, now)
        assert result.applied
        assert _job(result).status is JobStatus.COMPLETED
        assert _job(result).status.final
        assert (_job(result).server_id, _job(result).fence) == (None, 7)

    async def test_complete_of_an_unowned_pending_job_applies(self, storage: Storage) -> None:
        now = _now()
        job = await _create(storage, at=now)
        result = await _apply(storage, job.id, JobEvent.COMPLETE, "s9", 0, now)
        assert result.applied
        assert _job(result).status is JobStatus.COMPLETED

    async def test_cancel_event_moves_live_jobs_to_deleting(self, storage: Storage) -> None:
        now = _now()
        pending = await _create(storage, at=now)
        running = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=3)
        for job in (pending, running):
            result = await _apply(storage, job.id, JobEvent.CANCEL, None, 0, now)
            assert result.applied
            assert _job(result).status is JobStatus.DELETING
            assert (_job(result).server_id, _job(result).fence) == (job.server_id, job.fence)

    async def test_confirm_deleted_by_the_owner_makes_the_job_deleted(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.DELETING, now, server="s1", fence=7)
        result = await _apply(storage, job.id, JobEvent.CONFIRM_DELETED, "s1", 7, now)
        assert result.applied
        assert _job(result).status is JobStatus.DELETED
        assert _job(result).server_id is None

    async def test_confirm_deleted_with_an_older_fence_is_refused_while_the_job_is_owned(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.DELETING, now, server="s1", fence=7)
        for server, fence in (("s2", 6), ("s1", 6), (None, 0)):
            result = await _apply(storage, job.id, JobEvent.CONFIRM_DELETED, server, fence, now)
            assert not result.applied, (server, fence)
            assert result.job == job

    async def test_confirm_deleted_by_a_newer_copy_than_the_recorded_owner_applies(
        self, storage: Storage
    ) -> None:
        """The job moved while the manager was away: the new owner's confirmation
        counts, the recorded owner is stale."""
        now = _now()
        job = await _in_status(storage, JobStatus.DELETING, now, server="s1", fence=7)
        result = await _apply(storage, job.id, JobEvent.CONFIRM_DELETED, "s2", 8, now)
        assert result.applied
        assert _job(result).status is JobStatus.DELETED

    async def test_complete_by_an_older_copy_is_refused(self, storage: Storage) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        result = await _apply(storage, job.id, JobEvent.COMPLETE, "s2", 6, now)
        assert not result.applied
        assert result.job == job

    async def test_confirm_deleted_of_an_unowned_job_is_accepted_from_anyone(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _create(storage, at=now)
        await storage.request_cancel(job.id, now, HOLDER, now + LEASE)
        result = await _apply(storage, job.id, JobEvent.CONFIRM_DELETED, None, 0, now)
        assert result.applied
        assert _job(result).status is JobStatus.DELETED

    async def test_concurrent_starts_leave_the_newest_fence(self, storage: Storage) -> None:
        now = _now()
        job = await _create(storage, at=now)
        fences = list(range(1, 31))
        random.Random(7).shuffle(fences)
        results = await asyncio.gather(
            *(_apply(storage, job.id, JobEvent.START, f"s{f}", f, now) for f in fences)
        )
        for fence, result in zip(fences, results, strict=True):
            seen = _job(result)
            if result.applied:
                assert (seen.server_id, seen.fence) == (f"s{fence}", fence)
            else:
                assert seen.fence > fence, "a start was refused by an older or equal fence"
        final = await _get(storage, job.id)
        assert (final.server_id, final.fence) == ("s30", 30)
        assert results[fences.index(30)].applied

    async def test_concurrent_starts_with_one_fence_from_many_servers_have_one_winner(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _create(storage, at=now)
        results = await asyncio.gather(
            *(_apply(storage, job.id, JobEvent.START, f"s{i}", 4, now) for i in range(12))
        )
        winners = [i for i, result in enumerate(results) if result.applied]
        assert len(winners) == 1
        final = await _get(storage, job.id)
        assert (final.server_id, final.fence) == (f"s{winners[0]}", 4)
