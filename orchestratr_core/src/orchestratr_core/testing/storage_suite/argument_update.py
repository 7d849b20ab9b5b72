"""Storage conformance, updating a job's argument (``request_update``): the
restart under a new generation once the old copy is confirmed stopped, and its
races with a hand-over, a crash, a cancel and a pause."""

from __future__ import annotations

import asyncio

import pytest

from orchestratr_core.errors import UnknownJob
from orchestratr_core.job import JobEvent, JobRecord, JobStatus, make_fence, new_id
from orchestratr_core.protocol import RunningJob
from orchestratr_core.storage import OutboxKind, Storage
from orchestratr_core.testing.storage_suite._common import (
    HOLDER,
    LEASE,
    _all_outbox,
    _apply,
    _get,
    _heartbeat,
    _in_status,
    _must,
    _now,
    _sec,
)

__all__ = ["ArgumentUpdateTests"]


async def _outbox_of(storage: Storage, job_id: str, now: object) -> list[tuple[OutboxKind, int]]:
    items = await _all_outbox(storage, now)  # type: ignore[arg-type]
    return [(i.kind, i.generation) for i in items if i.job_id == job_id]


def _restarted(before: JobRecord, after: JobRecord, argument: str) -> None:
    """``after`` is ``before`` restarted by an update: pending, unowned, under the
    next generation, fenced above every copy of an older message."""
    assert after.status is JobStatus.PENDING
    assert after.server_id is None
    assert after.argument == argument
    assert after.generation == before.generation + 1
    assert after.fence == make_fence(before.generation + 1, 0)
    assert not after.update_pending
    assert after.reason == "restarted with the updated argument"


class ArgumentUpdateTests:
    """``request_update``, ``CONFIRM_HELD`` of an updated job, ``update_floors``."""

    async def test_update_of_a_running_job_stops_it_and_keeps_the_owner(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        updated, changed = await storage.request_update(job.id, "new", now, HOLDER, now + LEASE)
        assert changed
        assert (updated.status, updated.server_id, updated.fence) == (JobStatus.PAUSING, "s1", 7)
        assert (updated.argument, updated.argument_version) == ("new", 1)
        assert updated.update_pending
        assert updated.update_floor == job.generation
        assert updated.reason == "update requested"
        assert updated.argument_updated_at is not None
        assert abs((updated.argument_updated_at - now).total_seconds()) < 0.002
        assert updated == await _get(storage, job.id)
        assert (OutboxKind.CANCEL, job.generation) in await _outbox_of(storage, job.id, now)
        # The hold mark stops the copy of the old argument wherever it runs.
        assert (job.id, job.generation) in await storage.held_jobs()

    async def test_confirmed_stop_restarts_it_under_a_new_generation(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        await storage.request_update(job.id, "new", now, HOLDER, now + LEASE)
        # A stale owner (lower fence) cannot confirm for the owner.
        assert not (await _apply(storage, job.id, JobEvent.CONFIRM_HELD, "s0", 6, now)).applied
        later = now + _sec(1)
        confirmed = await _must(storage, job.id, JobEvent.CONFIRM_HELD, "s1", 7, later)
        _restarted(job, confirmed, "new")
        assert confirmed == await _get(storage, job.id)
        # Its message is the relay's to send (unclaimed), under the new generation.
        assert (OutboxKind.PUBLISH, job.generation + 1) in await _outbox_of(storage, job.id, later)
        assert job.id not in [job_id for job_id, _ in await storage.held_jobs()]
        # Servers drop every older message (they carry the old argument).
        assert (job.id, job.generation) in await storage.update_floors(now - _sec(60))
        assert job.id not in [j for j, _ in await storage.update_floors(later + _sec(60))]
        # A copy of an old-generation message (a stray, or a server without the
        # floor) is refused; the new generation's first delivery starts.
        stale = make_fence(job.generation, 9)
        assert not (await _apply(storage, job.id, JobEvent.START, "s2", stale, later)).applied
        fresh = make_fence(job.generation + 1, 1)
        started = await _must(storage, job.id, JobEvent.START, "s3", fresh, later)
        assert (started.status, started.argument, started.server_id) == (
            JobStatus.PROCESSING,
            "new",
            "s3",
        )
        # Its floor stays listed while it runs (within the retention).
        assert job.id in [j for j, _ in await storage.update_floors(now - _sec(60))]

    async def test_update_of_a_queued_job_restarts_once_its_message_is_dropped(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PENDING, now, server="s1", fence=7)
        updated, changed = await storage.request_update(job.id, "v2", now, HOLDER, now + LEASE)
        assert changed and updated.status is JobStatus.PAUSING and updated.server_id is None
        dropped = await _must(storage, job.id, JobEvent.CONFIRM_HELD, "s2", 8, now + _sec(1))
        _restarted(job, dropped, "v2")

    async def test_update_racing_a_hand_over_is_not_lost(self, storage: Storage) -> None:
        """Update vs hand-over: the owner dies after the update; the old message
        reaches another server. Its start is refused (the job is pausing) and its
        drop confirms: the job restarts with the new argument."""
        now = _now()
        await storage.apply_heartbeat(_heartbeat("s1", at=now), now)
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        await storage.request_update(job.id, "new", now, HOLDER, now + LEASE)
        await storage.expire_servers(now + _sec(1), now + _sec(1))  # s1 dies
        lost = await _get(storage, job.id)
        assert (lost.status, lost.server_id, lost.update_pending) == (JobStatus.PAUSING, None, True)
        start = await _apply(storage, job.id, JobEvent.START, "s2", 8, now + _sec(2))
        assert not start.applied
        refused = await storage.apply_heartbeat(
            _heartbeat("s2", [RunningJob(job.id, 8)], at=now + _sec(2)), now + _sec(2)
        )
        assert [r.id for r in refused] == [job.id]
        confirmed = await _must(storage, job.id, JobEvent.CONFIRM_HELD, "s2", 8, now + _sec(3))
        _restarted(job, confirmed, "new")

    async def test_update_racing_a_crash_is_confirmed_by_the_dead_owner(
        self, storage: Storage
    ) -> None:
        """Update vs crash: the owner died before reporting the stop; the manager
        confirms for the dead server (owner cleared) and the job restarts."""
        now = _now()
        await storage.apply_heartbeat(_heartbeat("s1", at=now), now)
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        await storage.request_update(job.id, "new", now, HOLDER, now + LEASE)
        await storage.expire_servers(now + _sec(1), now + _sec(1))
        confirmed = await _must(storage, job.id, JobEvent.CONFIRM_HELD, None, 7, now + _sec(2))
        _restarted(job, confirmed, "new")

    async def test_update_racing_cancel_ends_cancelled(self, storage: Storage) -> None:
        """Update vs cancel, at once: whichever runs first, the job ends
        ``deleting`` and never restarts; an update that lost changed nothing."""
        for _ in range(5):
            now = _now()
            job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
            update, cancel = await asyncio.gather(
                storage.request_update(job.id, "new", now, HOLDER, now + LEASE),
                storage.request_cancel(job.id, now, HOLDER, now + LEASE),
            )
            assert cancel[1]
            after = await _get(storage, job.id)
            assert after.status is JobStatus.DELETING
            assert after.argument == ("new" if update[1] else job.argument)
            # Its owner confirms the cancel, never an update's restart.
            assert not (await _apply(storage, job.id, JobEvent.CONFIRM_HELD, "s1", 7, now)).applied
            done = await _must(storage, job.id, JobEvent.CONFIRM_DELETED, "s1", 7, now)
            assert (done.status, done.generation) == (JobStatus.DELETED, job.generation)

    @pytest.mark.parametrize("status", [JobStatus.PAUSED, JobStatus.QUARANTINED])
    async def test_update_of_a_held_job_keeps_it_held_and_it_resumes_with_it(
        self, storage: Storage, status: JobStatus
    ) -> None:
        now = _now()
        job = await _in_status(storage, status, now, server="s1", fence=7)
        if status is JobStatus.QUARANTINED:
            job = await _must(storage, job.id, JobEvent.CONFIRM_HELD, "s1", 7, now)
        updated, changed = await storage.request_update(job.id, "new", now, HOLDER, now + LEASE)
        assert changed
        assert (updated.status, updated.argument, updated.update_pending) == (status, "new", False)
        assert updated.generation == job.generation
        resumed, changed = await storage.request_resume(job.id, now, HOLDER, now + LEASE)
        assert changed
        assert (resumed.status, resumed.argument) == (JobStatus.PENDING, "new")

    async def test_pause_wins_over_an_update_restart(self, storage: Storage) -> None:
        """A pause while an update is stopping the job: it ends paused (with the
        new argument), not restarted; an update of a pausing job does not restart it."""
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        await storage.request_update(job.id, "new", now, HOLDER, now + LEASE)
        paused, changed = await storage.request_pause(job.id, now, HOLDER, now + LEASE)
        assert changed
        assert (paused.status, paused.update_pending) == (JobStatus.PAUSING, False)
        confirmed = await _must(storage, job.id, JobEvent.CONFIRM_HELD, "s1", 7, now)
        assert (confirmed.status, confirmed.argument) == (JobStatus.PAUSED, "new")
        assert confirmed.generation == job.generation
        # Paused by a client first, then updated: still ends paused.
        other = await _in_status(storage, JobStatus.PAUSING, now, server="s1", fence=7)
        again, changed = await storage.request_update(other.id, "x", now, HOLDER, now + LEASE)
        assert changed and not again.update_pending
        confirmed = await _must(storage, other.id, JobEvent.CONFIRM_HELD, "s1", 7, now)
        assert (confirmed.status, confirmed.argument) == (JobStatus.PAUSED, "x")

    async def test_a_second_update_before_the_restart_keeps_the_newest(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        await storage.request_update(job.id, "a", now, HOLDER, now + LEASE)
        second, changed = await storage.request_update(job.id, "b", now, HOLDER, now + LEASE)
        assert changed
        assert (second.argument, second.argument_version, second.update_pending) == ("b", 2, True)
        confirmed = await _must(storage, job.id, JobEvent.CONFIRM_HELD, "s1", 7, now)
        _restarted(job, confirmed, "b")

    @pytest.mark.parametrize("status", [JobStatus.DELETING, JobStatus.DELETED, JobStatus.COMPLETED])
    async def test_update_of_a_cancelled_or_finished_job_changes_nothing(
        self, storage: Storage, status: JobStatus
    ) -> None:
        now = _now()
        job = await _in_status(storage, status, now, server="s1", fence=7)
        after, changed = await storage.request_update(job.id, "new", now, HOLDER, now + LEASE)
        assert not changed
        assert after == job == await _get(storage, job.id)

    async def test_update_of_an_unknown_job_raises(self, storage: Storage) -> None:
        now = _now()
        with pytest.raises(UnknownJob):
            await storage.request_update(new_id(), "x", now, HOLDER, now + LEASE)
