"""Storage conformance, the lifecycle controls: pause and resume, quarantine,
checkpoints under a fence, restart budgets; and their races."""

from __future__ import annotations

import asyncio
import random

import pytest

from orchestratr_core.errors import UnknownJob
from orchestratr_core.job import JobEvent, JobStatus, new_id
from orchestratr_core.lifecycle import MAX_CHECKPOINT_BYTES
from orchestratr_core.protocol import RunningJob
from orchestratr_core.storage import FailureCount, OutboxKind, Storage
from orchestratr_core.testing.storage_suite._common import (
    HOLDER,
    LEASE,
    _all_outbox,
    _apply,
    _create,
    _create_many,
    _get,
    _heartbeat,
    _in_status,
    _must,
    _new_job,
    _now,
    _same_time,
    _sec,
)

__all__ = ["JobLifecycleTests"]


class JobLifecycleTests:
    """``request_pause``, ``request_resume``, ``CONFIRM_HELD``, ``QUARANTINE``,
    ``save_checkpoints``, ``held_jobs``, ``set_restart_budget``."""

    async def test_pause_of_a_running_job_keeps_its_owner_and_queues_a_cancel_row(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        paused, changed = await storage.request_pause(job.id, now, HOLDER, now + LEASE)
        assert changed
        assert (paused.status, paused.server_id, paused.fence) == (JobStatus.PAUSING, "s1", 7)
        assert paused.reason == "pause requested"
        items = [i for i in await _all_outbox(storage, now) if i.job_id == job.id]
        assert [(i.kind, i.generation) for i in items][-1] == (OutboxKind.CANCEL, job.generation)
        assert (job.id, job.generation) in await storage.held_jobs()

    @pytest.mark.parametrize(
        "status",
        [
            JobStatus.PAUSING,
            JobStatus.PAUSED,
            JobStatus.QUARANTINED,
            JobStatus.DELETING,
            JobStatus.DELETED,
            JobStatus.COMPLETED,
        ],
    )
    async def test_pause_of_a_job_that_is_not_live_changes_nothing(
        self, storage: Storage, status: JobStatus
    ) -> None:
        now = _now()
        job = await _in_status(storage, status, now)
        again, changed = await storage.request_pause(job.id, now + _sec(1), HOLDER, now + LEASE)
        assert not changed
        assert again == job

    async def test_pause_and_resume_of_an_unknown_job_raise_unknown_job(
        self, storage: Storage
    ) -> None:
        now = _now()
        with pytest.raises(UnknownJob):
            await storage.request_pause(new_id(), now, HOLDER, now + LEASE)
        with pytest.raises(UnknownJob):
            await storage.request_resume(new_id(), now, HOLDER, now + LEASE)

    async def test_only_the_owner_or_a_newer_copy_confirms_a_pause(self, storage: Storage) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PAUSING, now, server="s1", fence=7)
        stale = await _apply(storage, job.id, JobEvent.CONFIRM_HELD, "s0", 6, now)
        assert not stale.applied
        confirmed = await _must(storage, job.id, JobEvent.CONFIRM_HELD, "s1", 7, now)
        assert (confirmed.status, confirmed.server_id, confirmed.fence) == (
            JobStatus.PAUSED,
            None,
            7,
        )

    async def test_resume_gives_a_paused_job_a_new_generation_and_a_publish_row(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PAUSED, now)
        later = now + _sec(5)
        resumed, changed = await storage.request_resume(job.id, later, HOLDER, later + LEASE)
        assert changed
        assert resumed.status is JobStatus.PENDING
        assert resumed.generation == job.generation + 1
        assert resumed.server_id is None
        assert resumed.reason == "resumed"
        items = [i for i in await _all_outbox(storage, later) if i.job_id == job.id]
        assert (OutboxKind.PUBLISH, job.generation + 1) in [(i.kind, i.generation) for i in items]
        assert job.id not in [job_id for job_id, _ in await storage.held_jobs()]

    async def test_resume_gives_a_fresh_restart_budget(self, storage: Storage) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        await storage.record_failure(
            job.id, seq=0, failure_log='[[1.0, "x"]]', now=now, quarantine="spent"
        )
        await _must(storage, job.id, JobEvent.CONFIRM_HELD, "s1", 7, now)
        resumed, changed = await storage.request_resume(job.id, now, HOLDER, now + LEASE)
        assert changed
        # The count's version moves on too: a count read before the resume loses.
        assert (resumed.failure_log, resumed.failure_seq) == (None, 2)

    async def test_resume_waits_until_no_server_holds_a_copy(self, storage: Storage) -> None:
        now = _now()
        for status in (JobStatus.PAUSING, JobStatus.QUARANTINED):
            job = await _in_status(storage, status, now, server="s1", fence=7)
            again, changed = await storage.request_resume(job.id, now, HOLDER, now + LEASE)
            assert not changed, status
            assert again == job
            await _must(storage, job.id, JobEvent.CONFIRM_HELD, "s1", 7, now)
            resumed, changed = await storage.request_resume(job.id, now, HOLDER, now + LEASE)
            assert changed
            assert resumed.status is JobStatus.PENDING

    @pytest.mark.parametrize("status", [JobStatus.PENDING, JobStatus.PROCESSING, JobStatus.DELETED])
    async def test_resume_of_a_job_that_is_not_held_changes_nothing(
        self, storage: Storage, status: JobStatus
    ) -> None:
        now = _now()
        job = await _in_status(storage, status, now)
        again, changed = await storage.request_resume(job.id, now, HOLDER, now + LEASE)
        assert not changed
        assert again == job

    async def test_quarantine_is_the_owners_and_keeps_its_reason_through_the_confirmation(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        refused = await _apply(storage, job.id, JobEvent.QUARANTINE, "s2", 7, now)
        assert not refused.applied
        quarantined = await _apply(
            storage,
            job.id,
            JobEvent.QUARANTINE,
            "s1",
            7,
            now,
            error="boom",
            restarts=5,
            reason="restart budget spent",
        )
        assert quarantined.applied
        assert quarantined.job is not None
        assert quarantined.job.status is JobStatus.QUARANTINED
        assert (quarantined.job.last_error, quarantined.job.restarts) == ("boom", 5)
        confirmed = await _must(storage, job.id, JobEvent.CONFIRM_HELD, "s1", 7, now)
        assert confirmed.status is JobStatus.QUARANTINED
        assert confirmed.reason == "restart budget spent"
        assert confirmed.server_id is None

    async def test_a_lost_server_clears_the_owner_of_its_held_jobs_and_they_stay_held(
        self, storage: Storage
    ) -> None:
        now = _now()
        await storage.apply_heartbeat(_heartbeat("s1", at=now), now)
        pausing = await _in_status(storage, JobStatus.PAUSING, now, server="s1", fence=7)
        quarantined = await _in_status(storage, JobStatus.QUARANTINED, now, server="s1", fence=7)
        await storage.expire_servers(now + _sec(1), now + _sec(1))
        for job in (pausing, quarantined):
            after = await _get(storage, job.id)
            assert (after.status, after.server_id) == (job.status, None)

    async def test_pause_racing_a_hand_over_the_new_owner_is_refused_and_confirms(
        self, storage: Storage
    ) -> None:
        """Pause vs hand-over: the job is pausing when its message reaches another
        server. That copy's start is refused; its drop of the message confirms."""
        now = _now()
        await storage.apply_heartbeat(_heartbeat("s1", at=now), now)
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        await storage.request_pause(job.id, now, HOLDER, now + LEASE)
        await storage.expire_servers(now + _sec(1), now + _sec(1))  # s1 dies
        start = await _apply(storage, job.id, JobEvent.START, "s2", 8, now + _sec(2))
        assert not start.applied
        refused = await storage.apply_heartbeat(
            _heartbeat("s2", [RunningJob(job.id, 8)], at=now + _sec(2)), now + _sec(2)
        )
        assert [r.id for r in refused] == [job.id]
        confirmed = await _must(storage, job.id, JobEvent.CONFIRM_HELD, "s2", 8, now + _sec(3))
        assert confirmed.status is JobStatus.PAUSED

    async def test_resume_racing_cancel_ends_cancelled(self, storage: Storage) -> None:
        """Resume vs cancel on a paused job, at once: whichever runs first, the job
        ends ``deleting`` (a resumed job is cancelled; a cancelled one is never
        resumed)."""
        for _ in range(5):
            now = _now()
            job = await _in_status(storage, JobStatus.PAUSED, now)
            resume, cancel = await asyncio.gather(
                storage.request_resume(job.id, now, HOLDER, now + LEASE),
                storage.request_cancel(job.id, now, HOLDER, now + LEASE),
            )
            assert cancel[1]
            after = await _get(storage, job.id)
            assert after.status is JobStatus.DELETING
            # A resume that lost the race changed nothing; one that won made a new generation.
            assert after.generation == job.generation + (1 if resume[1] else 0)

    async def test_cancel_of_a_paused_job_needs_no_server(self, storage: Storage) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PAUSED, now)
        cancelled, changed = await storage.request_cancel(job.id, now, HOLDER, now + LEASE)
        assert changed
        assert (cancelled.status, cancelled.server_id) == (JobStatus.DELETING, None)
        deleted = await _must(storage, job.id, JobEvent.CONFIRM_DELETED, None, job.fence, now)
        assert deleted.status is JobStatus.DELETED

    async def test_checkpoints_of_the_owner_are_stored_and_a_stale_owner_never_overwrites(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        assert await storage.save_checkpoints("s1", [(job.id, 7, "at 1")], now) == [job.id]
        stored = await _get(storage, job.id)
        assert (stored.checkpoint, stored.checkpoint_fence) == ("at 1", 7)
        assert stored.checkpoint_at is not None
        # A newer owner takes over and writes; the old one keeps writing.
        await _must(storage, job.id, JobEvent.START, "s2", 9, now + _sec(1))
        assert await storage.save_checkpoints("s2", [(job.id, 9, "at 2")], now) == [job.id]
        assert await storage.save_checkpoints("s1", [(job.id, 7, "stale")], now) == []
        # An equal token from another server than the owner is refused too.
        assert await storage.save_checkpoints("s3", [(job.id, 9, "twin")], now) == []
        after = await _get(storage, job.id)
        assert (after.checkpoint, after.checkpoint_fence) == ("at 2", 9)
        assert (after.status, after.server_id, after.fence) == (JobStatus.PROCESSING, "s2", 9)

    async def test_a_checkpoint_is_kept_through_pause_and_resume_and_dropped_when_final(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        await storage.save_checkpoints("s1", [(job.id, 7, "kept")], now)
        await storage.request_pause(job.id, now, HOLDER, now + LEASE)
        # The pausing owner's last checkpoint still counts.
        assert await storage.save_checkpoints("s1", [(job.id, 7, "last")], now) == [job.id]
        await _must(storage, job.id, JobEvent.CONFIRM_HELD, "s1", 7, now)
        resumed, _ = await storage.request_resume(job.id, now, HOLDER, now + LEASE)
        assert resumed.checkpoint == "last"
        done = await _in_status(storage, JobStatus.COMPLETED, now)
        assert await storage.save_checkpoints("s1", [(done.id, 7, "late")], now) == []

    async def test_a_checkpoint_of_the_largest_size_is_stored_exactly(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        text = ("é✓" * MAX_CHECKPOINT_BYTES)[: MAX_CHECKPOINT_BYTES // 3]
        assert len(text.encode("utf-8")) <= MAX_CHECKPOINT_BYTES
        assert await storage.save_checkpoints("s1", [(job.id, 7, text)], now) == [job.id]
        assert (await _get(storage, job.id)).checkpoint == text

    async def test_checkpoints_racing_owners_follow_the_fence(self, storage: Storage) -> None:
        """I9 under concurrency: owners with growing tokens take the job over while
        every one of them keeps writing; the stored checkpoint's token never falls
        and is always the largest token that wrote one."""
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s0", fence=1)
        rng = random.Random(15)
        seen: list[int] = []

        async def owner(fence: int) -> None:
            await _apply(storage, job.id, JobEvent.START, f"s{fence}", fence, now)
            for step in range(3):
                await asyncio.sleep(rng.random() / 200)
                await storage.save_checkpoints(
                    f"s{fence}", [(job.id, fence, f"{fence}/{step}")], now
                )
                seen.append((await _get(storage, job.id)).checkpoint_fence or 0)

        await asyncio.gather(*(owner(fence) for fence in range(2, 10)))
        after = await _get(storage, job.id)
        assert after.checkpoint_fence is not None
        assert after.checkpoint is not None
        assert after.checkpoint.split("/")[0] == str(after.checkpoint_fence)
        assert after.checkpoint_fence <= after.fence
        assert after.checkpoint_fence == 9 or after.fence > after.checkpoint_fence

    async def test_restart_budget_is_recorded(self, storage: Storage) -> None:
        now = _now()
        job = await _create(storage, at=now)
        await storage.set_restart_budget(job.id, 3, 120.0)
        stored = await _get(storage, job.id)
        assert (stored.max_restarts, stored.restart_window) == (3, 120.0)
        await storage.set_restart_budget(new_id(), 1, 1.0)  # unknown: ignored
        assert await storage.get_job(job.id) == stored

    async def test_failures_are_counted_by_compare_and_set_and_a_spent_budget_quarantines(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        first = await storage.record_failure(job.id, seq=0, failure_log='[[1.0, "a"]]', now=now)
        assert first.applied
        assert first.job is not None
        assert (first.job.failure_seq, first.job.failure_log) == (1, '[[1.0, "a"]]')
        assert first.job.status is JobStatus.PROCESSING
        # A writer that read the old count loses: it must read again.
        stale = await storage.record_failure(job.id, seq=0, failure_log="[]", now=now)
        assert not stale.applied
        assert stale.job == first.job
        spent = await storage.record_failure(
            job.id, seq=1, failure_log='[[1.0, "a"], [2.0, "b"]]', now=now, quarantine="spent ✓"
        )
        assert spent.applied
        assert spent.job is not None
        assert (spent.job.status, spent.job.reason) == (JobStatus.QUARANTINED, "spent ✓")
        assert (spent.job.server_id, spent.job.fence) == ("s1", 7)  # the owner confirms
        # Counted again while held: the count grows, the status stays.
        again = await storage.record_failure(
            job.id, seq=2, failure_log="[]", now=now, quarantine="other"
        )
        assert again.job is not None
        assert (again.job.status, again.job.reason, again.job.failure_seq) == (
            JobStatus.QUARANTINED,
            "spent ✓",
            3,
        )
        done = await _in_status(storage, JobStatus.COMPLETED, now)
        assert not (await storage.record_failure(done.id, seq=0, failure_log="[]", now=now)).applied
        unknown = await storage.record_failure(new_id(), seq=0, failure_log="[]", now=now)
        assert unknown.job is None

    async def test_many_failures_are_counted_at_once_each_by_its_own_compare_and_set(
        self, storage: Storage
    ) -> None:
        """``record_failures`` (the owner deaths of a dead server): each job's count
        is its own compare-and-set on ``failure_seq``; a stale one, a final job and
        an unknown id are left out of what applied, the others count, and a spent
        budget quarantines a pending or processing job (its owner kept) but not a
        paused one."""
        now = _now()
        later = now + _sec(1)
        pending = await _in_status(storage, JobStatus.PENDING, now)
        running = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        spent = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=9)
        paused = await _in_status(storage, JobStatus.PAUSED, now)
        stale = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=3)
        assert (await storage.record_failure(stale.id, seq=0, failure_log="[]", now=now)).applied
        done = await _in_status(storage, JobStatus.COMPLETED, now)
        unknown = new_id()
        counts = [
            FailureCount(pending.id, 0, '[[1.0, "owner died: ✓"]]'),
            FailureCount(running.id, 0, '[[2.0, "b"]]'),
            FailureCount(spent.id, 0, '[[3.0, "c"]]', quarantine="spent ✓"),
            FailureCount(paused.id, 0, '[[4.0, "d"]]', quarantine="spent"),
            FailureCount(stale.id, 0, '[[5.0, "stale"]]'),  # its count moved to 1
            FailureCount(done.id, 0, "[]"),
            FailureCount(unknown, 0, "[]"),
        ]
        applied = await storage.record_failures(counts, later)
        assert sorted(applied) == sorted([pending.id, running.id, spent.id, paused.id])
        for job, log in ((pending, '[[1.0, "owner died: ✓"]]'), (running, '[[2.0, "b"]]')):
            after = await _get(storage, job.id)
            assert (after.failure_seq, after.failure_log) == (1, log)
            assert (after.status, after.server_id, after.fence) == (
                job.status,
                job.server_id,
                job.fence,
            )
            assert _same_time(after.updated_at, later)
        quarantined = await _get(storage, spent.id)
        assert (quarantined.status, quarantined.reason) == (JobStatus.QUARANTINED, "spent ✓")
        assert (quarantined.server_id, quarantined.fence, quarantined.failure_seq) == ("s1", 9, 1)
        held = await _get(storage, paused.id)
        assert (held.status, held.failure_seq) == (JobStatus.PAUSED, 1)
        assert (await _get(storage, stale.id)).failure_log == "[]"  # the stale count lost
        assert (await _get(storage, done.id)).failure_seq == 0
        # Counted again from the counts read before: every compare-and-set loses.
        assert await storage.record_failures(counts, later) == []
        assert await storage.record_failures([], later) == []

    async def test_many_failures_at_once_go_beyond_one_statement_s_worth(
        self, storage: Storage
    ) -> None:
        """A dead server's thousands of jobs: all counted, each once."""
        now = _now()
        jobs = await _create_many(storage, [_new_job(at=now) for _ in range(2100)], now + LEASE)
        counts = [FailureCount(job.id, 0, f'[[1.0, "{i}"]]') for i, job in enumerate(jobs)]
        # A job named twice counts once.
        applied = await storage.record_failures([*counts, counts[0]], now)
        assert sorted(applied) == sorted(job.id for job in jobs)
        for job in (jobs[0], jobs[2050]):
            assert (await _get(storage, job.id)).failure_seq == 1

    # -- races (added: every pair at once, whichever runs first) ----------------------------

    async def test_pause_racing_a_hand_over_at_once_leaves_one_owner_to_confirm(
        self, storage: Storage
    ) -> None:
        """Pause vs hand-over, concurrently: a running job is paused while a newer
        copy (another server, a larger token) reports its start. Whichever runs
        first, the job ends ``pausing`` under exactly one owner -- the old one if
        the pause won (the new start is refused), the new one otherwise -- and
        only that owner's stop confirms it; the other's is refused."""
        for _ in range(5):
            now = _now()
            job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
            (_, paused), start = await asyncio.gather(
                storage.request_pause(job.id, now, HOLDER, now + LEASE),
                _apply(storage, job.id, JobEvent.START, "s2", 8, now),
            )
            assert paused
            after = await _get(storage, job.id)
            assert after.status is JobStatus.PAUSING
            owner, fence = ("s2", 8) if start.applied else ("s1", 7)
            assert (after.server_id, after.fence) == (owner, fence)
            other, other_fence = ("s1", 7) if start.applied else ("s2", 8)
            if other_fence < fence:  # a stale owner never confirms for the newer one
                stale = await _apply(
                    storage, job.id, JobEvent.CONFIRM_HELD, other, other_fence, now
                )
                assert not stale.applied
            confirmed = await _must(storage, job.id, JobEvent.CONFIRM_HELD, owner, fence, now)
            assert (confirmed.status, confirmed.server_id) == (JobStatus.PAUSED, None)

    async def test_quarantine_racing_resume_never_holds_the_resumed_job(
        self, storage: Storage
    ) -> None:
        """Quarantine vs resume: a quarantined job (its owner confirmed) is resumed
        while a failure counted from the state before the resume -- with a
        quarantine reason -- is written. The count is a compare-and-set on
        ``failure_seq``, which the resume moves: the stale count loses, or it
        lands first and the resume then releases the job. Either way the job ends
        ``pending`` under a new generation with a fresh budget."""
        for _ in range(5):
            now = _now()
            job = await _in_status(storage, JobStatus.QUARANTINED, now, server="s1", fence=7)
            job = await _must(storage, job.id, JobEvent.CONFIRM_HELD, "s1", 7, now)
            (_, changed), counted = await asyncio.gather(
                storage.request_resume(job.id, now, HOLDER, now + LEASE),
                storage.record_failure(
                    job.id,
                    seq=job.failure_seq,
                    failure_log='[[1.0, "late"]]',
                    now=now,
                    quarantine="spent again",
                ),
            )
            assert changed
            after = await _get(storage, job.id)
            assert after.status is JobStatus.PENDING
            assert after.generation == job.generation + 1
            assert after.failure_log is None  # the resume's fresh budget stands
            # The resume moved failure_seq; a count that landed first moved it too.
            assert after.failure_seq == job.failure_seq + (2 if counted.applied else 1)
            # A stale owner's quarantine of the resumed job is refused too.
            late = await _apply(storage, job.id, JobEvent.QUARANTINE, "s1", 7, now)
            assert not late.applied
            assert (await _get(storage, job.id)).status is JobStatus.PENDING

    async def test_quarantine_racing_cancel_ends_cancelled(self, storage: Storage) -> None:
        """A spent budget (the owner's quarantine) and a cancel at once: whichever
        runs first, the job ends ``deleting`` (a cancel takes a held job too)."""
        for _ in range(5):
            now = _now()
            job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
            await asyncio.gather(
                _apply(storage, job.id, JobEvent.QUARANTINE, "s1", 7, now, reason="spent"),
                storage.request_cancel(job.id, now, HOLDER, now + LEASE),
            )
            assert (await _get(storage, job.id)).status is JobStatus.DELETING

    async def test_a_checkpoint_from_a_lower_fence_of_the_same_server_is_refused(
        self, storage: Storage
    ) -> None:
        """The same server took the job again under a larger token (its message
        was redelivered to it): its older copy's checkpoint is refused, also while
        the job is held (``pausing``), and a refused write changes nothing."""
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        assert await storage.save_checkpoints("s1", [(job.id, 7, "old copy")], now) == [job.id]
        await _must(storage, job.id, JobEvent.START, "s1", 8, now + _sec(1))
        assert await storage.save_checkpoints("s1", [(job.id, 8, "new copy")], now) == [job.id]
        before = await _get(storage, job.id)
        assert await storage.save_checkpoints("s1", [(job.id, 7, "old again")], now) == []
        await storage.request_pause(job.id, now, HOLDER, now + LEASE)
        assert await storage.save_checkpoints("s1", [(job.id, 7, "old, held")], now) == []
        after = await _get(storage, job.id)
        assert (after.checkpoint, after.checkpoint_fence) == ("new copy", 8)
        assert after.checkpoint_at == before.checkpoint_at
