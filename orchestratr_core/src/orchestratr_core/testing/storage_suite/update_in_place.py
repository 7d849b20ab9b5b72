"""Storage conformance, updating a running job's argument *in place*
(``request_update_in_place``): the job stays ``processing``, every release of it
republishes it under a new generation with the new argument, the owner's
acknowledgement (``record_update_applied``) and the fallback to a restart
(``fall_back_update``), and their races with a crash, a hand-back, a cancel and
a pause."""

from __future__ import annotations

import itertools
from datetime import datetime

from orchestratr_core.job import JobEvent, JobRecord, JobStatus, make_fence
from orchestratr_core.placement import DEFAULT_KIND
from orchestratr_core.protocol import RunningJob, ServerHeartbeat
from orchestratr_core.storage import HEARTBEAT_REFRESH_STEP, OutboxKind, Storage
from orchestratr_core.testing.storage_suite._common import (
    FAR,
    HOLDER,
    LEASE,
    _all_outbox,
    _apply,
    _create,
    _get,
    _heartbeat,
    _must,
    _now,
    _sec,
)

__all__ = ["UpdateInPlaceTests"]

FENCE = make_fence(1, 1)
"""The fence of the first delivery of a job's first message."""


def _beat(
    server_id: str,
    jobs: list[JobRecord],
    at: datetime,
    *,
    updatable: tuple[str, ...] = (DEFAULT_KIND,),
    drops: bool = True,
    fence: int = FENCE,
) -> ServerHeartbeat:
    """A complete heartbeat of ``server_id`` running ``jobs`` under ``fence``, from
    a server that applies updates of ``updatable`` in place (``drops``: of the
    version that reads drop marks)."""
    base = _heartbeat(server_id, [RunningJob(job.id, fence) for job in jobs], at=at)
    return ServerHeartbeat(
        server_id=base.server_id,
        name=base.name,
        max_workers=base.max_workers,
        started_at=base.started_at,
        sent_at=base.sent_at,
        host=base.host,
        pid=base.pid,
        jobs=base.jobs,
        updatable=updatable,
        drops=drops,
    )


async def _running(
    storage: Storage, now: datetime, count: int = 1, updatable: tuple[str, ...] = (DEFAULT_KIND,)
) -> list[JobRecord]:
    """``count`` jobs started on ``s1`` by one heartbeat (of a server that applies
    updates of ``updatable`` in place)."""
    jobs = [await _create(storage, at=now) for _ in range(count)]
    refused = await storage.apply_heartbeat(_beat("s1", jobs, now, updatable=updatable), now)
    assert refused == []
    return [await _get(storage, job.id) for job in jobs]


async def _in_place(storage: Storage, job: JobRecord, argument: str, now: datetime) -> JobRecord:
    result = await storage.request_update_in_place(job.id, argument, now, HOLDER, now + LEASE)
    assert result is not None, "the update was not applied in place"
    updated, changed = result
    assert changed
    return updated


_AUDITS = itertools.count(1)


async def _outbox_of(storage: Storage, job_id: str, now: datetime) -> list[tuple[OutboxKind, int]]:
    """The job's outbox rows; each call claims them past the previous call's claim."""
    items = await _all_outbox(storage, now + 3 * next(_AUDITS) * FAR)
    return [(i.kind, i.generation) for i in items if i.job_id == job_id]


def _republished(before: JobRecord, after: JobRecord, argument: str, reason: str) -> None:
    """``after`` is ``before`` (updated in place) released: pending, unowned,
    under the next generation, fenced above every copy of the old message."""
    assert after.status is JobStatus.PENDING
    assert after.server_id is None
    assert after.argument == argument
    assert after.generation == before.generation + 1
    assert after.fence == make_fence(before.generation + 1, 0)
    assert after.reason == reason
    assert after.update_mode == "restart"


class UpdateInPlaceTests:
    """``request_update_in_place``, the releases of a job updated in place,
    ``record_update_applied``, ``unapplied_updates``, ``fall_back_update``,
    ``inplace_floors``."""

    async def test_update_in_place_keeps_the_job_running(self, storage: Storage) -> None:
        now = _now()
        (job,) = await _running(storage, now)
        updated = await _in_place(storage, job, "new", now + _sec(1))
        assert (updated.status, updated.server_id, updated.fence, updated.generation) == (
            JobStatus.PROCESSING,
            "s1",
            FENCE,
            job.generation,
        )
        assert (updated.argument, updated.argument_version) == ("new", 1)
        assert updated.inplace_floor == job.generation
        assert updated.argument_applied_version == 0
        assert not updated.update_pending
        assert updated.update_floor is None
        assert updated.reason == "argument updated in place"
        assert updated.update_mode == "in_place"
        assert updated == await _get(storage, job.id)
        # The stop set is rewritten (the drop mark), the copy is not held.
        assert (OutboxKind.CANCEL, job.generation) in await _outbox_of(storage, job.id, now)
        assert (job.id, job.generation) in await storage.inplace_floors(now)
        assert job.id not in {job_id for job_id, _ in await storage.held_jobs()}
        assert job.id not in {job_id for job_id, _ in await storage.update_floors(now)}
        # Kept while younger than the retention only.
        assert job.id not in {j for j, _ in await storage.inplace_floors(now + _sec(2))}
        assert [j.id for j in await storage.unapplied_updates(now)] == [job.id]

    async def test_not_in_place_unless_the_owner_runs_the_kind_as_updatable(
        self, storage: Storage
    ) -> None:
        now = _now()
        (job,) = await _running(storage, now, updatable=())
        assert await storage.request_update_in_place(job.id, "x", now, HOLDER, now + LEASE) is None
        unchanged = await _get(storage, job.id)
        assert (unchanged.argument, unchanged.argument_version) == (job.argument, 0)
        assert unchanged.inplace_floor is None
        assert await _outbox_of(storage, job.id, now) == [(OutboxKind.PUBLISH, 1)]

    async def test_not_in_place_while_a_server_of_an_older_version_lives(
        self, storage: Storage
    ) -> None:
        now = _now()
        (job,) = await _running(storage, now)
        # s2 reads no drop marks: it would start the old message after a crash.
        await storage.apply_heartbeat(_beat("s2", [], now, updatable=(), drops=False), now)
        assert await storage.request_update_in_place(job.id, "x", now, HOLDER, now + LEASE) is None
        assert (await _get(storage, job.id)).argument_version == 0
        # Once it is dead (s1 heard later), the update applies in place.
        later = now + _sec(5)
        await storage.apply_heartbeat(_beat("s1", [job], later), later)
        await storage.expire_servers(now + _sec(1), later)
        assert (await _in_place(storage, job, "x", later)).argument_version == 1

    async def test_not_in_place_for_a_job_that_does_not_run_or_a_dead_owner(
        self, storage: Storage
    ) -> None:
        now = _now()
        pending = await _create(storage, at=now)
        assert await storage.request_update_in_place(pending.id, "x", now, HOLDER, now) is None
        (job,) = await _running(storage, now)
        _, changed = await storage.request_pause(job.id, now, HOLDER, now + LEASE)
        assert changed
        assert await storage.request_update_in_place(job.id, "x", now, HOLDER, now) is None
        (other,) = await _running(storage, now)
        # The owner is declared dead: the job is pending, nothing applies in place.
        await storage.expire_servers(now + _sec(1), now + _sec(1))
        assert await storage.request_update_in_place(other.id, "x", now, HOLDER, now) is None
        assert (await _get(storage, other.id)).argument_version == 0

    async def test_owner_death_republishes_it_with_the_new_argument(self, storage: Storage) -> None:
        now = _now()
        job, plain = await _running(storage, now, count=2)
        await _in_place(storage, job, "new", now)
        later = now + _sec(1)
        await storage.expire_servers(later, later)
        released = await _get(storage, job.id)
        _republished(job, released, "new", "server dead")
        assert (OutboxKind.PUBLISH, job.generation + 1) in await _outbox_of(storage, job.id, now)
        # The drop mark stays: the broker's old message is dropped, never started.
        assert (job.id, job.generation) in await storage.inplace_floors(now)
        # A job of the same server not updated in place is released as always.
        other = await _get(storage, plain.id)
        assert (other.status, other.generation, other.fence) == (JobStatus.PENDING, 1, FENCE)
        assert await _outbox_of(storage, plain.id, now) == [(OutboxKind.PUBLISH, 1)]
        # The new message's copy starts; a copy of the old one cannot (fence).
        assert not (
            await _apply(storage, job.id, JobEvent.START, "s3", make_fence(1, 9), later)
        ).applied
        started = await _must(storage, job.id, JobEvent.START, "s2", make_fence(2, 1), later)
        assert (started.status, started.server_id, started.argument) == (
            JobStatus.PROCESSING,
            "s2",
            "new",
        )
        assert started.update_mode == "restart"
        assert await storage.unapplied_updates(now) == []

    async def test_a_server_that_leaves_republishes_it(self, storage: Storage) -> None:
        now = _now()
        (job,) = await _running(storage, now)
        await _in_place(storage, job, "new", now)
        assert await storage.server_left("s1", now + _sec(1))
        _republished(job, await _get(storage, job.id), "new", "server left")
        assert (OutboxKind.PUBLISH, job.generation + 1) in await _outbox_of(storage, job.id, now)

    async def test_a_hand_back_republishes_it(self, storage: Storage) -> None:
        now = _now()
        (job,) = await _running(storage, now)
        await _in_place(storage, job, "new", now)
        # A stale owner's release is refused (guard OWNER), and republishes nothing.
        assert not (await _apply(storage, job.id, JobEvent.RELEASE, "s0", FENCE, now)).applied
        assert not (await _apply(storage, job.id, JobEvent.RELEASE, "s1", FENCE - 1, now)).applied
        result = await _apply(
            storage, job.id, JobEvent.RELEASE, "s1", FENCE, now + _sec(1), reason="drained"
        )
        assert result.applied
        assert result.job == await _get(storage, job.id)
        _republished(job, await _get(storage, job.id), "new", "drained")
        outbox = await _outbox_of(storage, job.id, now)
        assert outbox.count((OutboxKind.PUBLISH, job.generation + 1)) == 1

    async def test_a_heartbeat_that_leaves_it_out_republishes_it(self, storage: Storage) -> None:
        now = _now()
        listed, unlisted, gone = await _running(storage, now, count=3)
        for job in (listed, unlisted, gone):
            await _in_place(storage, job, "new", now)
        later = now + _sec(1)
        # A complete listing without ``unlisted``.
        await storage.apply_heartbeat(_beat("s1", [listed, gone], later), later)
        unreported = "not reported by its server"
        _republished(unlisted, await _get(storage, unlisted.id), "new", unreported)
        assert (await _get(storage, listed.id)).status is JobStatus.PROCESSING
        # A delta naming ``gone``.
        base = _beat("s1", [], later)
        delta = ServerHeartbeat(
            server_id="s1",
            name=base.name,
            max_workers=base.max_workers,
            started_at=base.started_at,
            sent_at=base.sent_at,
            seq=3,
            base=2,
            gone=(gone.id,),
            updatable=base.updatable,
            drops=True,
        )
        await storage.apply_heartbeat(delta, later)
        _republished(gone, await _get(storage, gone.id), "new", unreported)
        kept = await _get(storage, listed.id)
        assert (kept.status, kept.generation, kept.inplace_floor) == (JobStatus.PROCESSING, 1, 1)
        for job in (unlisted, gone):
            assert (OutboxKind.PUBLISH, 2) in await _outbox_of(storage, job.id, now)
        assert (OutboxKind.PUBLISH, 2) not in await _outbox_of(storage, listed.id, now)

    async def test_the_owner_acknowledges_the_version_it_took(self, storage: Storage) -> None:
        now = _now()
        (job,) = await _running(storage, now)
        await _in_place(storage, job, "v1", now)
        # Only the owner's copy under its fence, and only a version that exists.
        assert not await storage.record_update_applied(job.id, "s2", FENCE, 1)
        assert not await storage.record_update_applied(job.id, "s1", FENCE + 1, 1)
        assert not await storage.record_update_applied(job.id, "s1", FENCE, 2)
        assert await storage.record_update_applied(job.id, "s1", FENCE, 1)
        assert not await storage.record_update_applied(job.id, "s1", FENCE, 1)  # once
        acked = await _get(storage, job.id)
        assert (acked.argument_applied_version, acked.status) == (1, JobStatus.PROCESSING)
        assert await storage.unapplied_updates(now) == []
        # An acknowledged update is not restarted.
        _, changed = await storage.fall_back_update(job.id, 1, now, HOLDER, now + LEASE)
        assert not changed

    async def test_a_second_update_before_the_first_is_acknowledged(self, storage: Storage) -> None:
        now = _now()
        (job,) = await _running(storage, now)
        await _in_place(storage, job, "v1", now)
        second = await _in_place(storage, job, "v2", now + _sec(1))
        assert (second.argument, second.argument_version, second.inplace_floor) == ("v2", 2, 1)
        # The late acknowledgement of v1 counts v1, not v2.
        assert await storage.record_update_applied(job.id, "s1", FENCE, 1)
        assert [j.argument_applied_version for j in await storage.unapplied_updates(now)] == [1]
        # A fallback read for v1 loses to the newer update; one for v2 applies.
        _, changed = await storage.fall_back_update(job.id, 1, now, HOLDER, now + LEASE)
        assert not changed
        assert (await _get(storage, job.id)).status is JobStatus.PROCESSING
        assert await storage.record_update_applied(job.id, "s1", FENCE, 2)
        assert await storage.unapplied_updates(now) == []

    async def test_no_acknowledgement_falls_back_to_the_restart(self, storage: Storage) -> None:
        now = _now()
        (job,) = await _running(storage, now)
        await _in_place(storage, job, "new", now)
        later = now + _sec(3)
        fell, changed = await storage.fall_back_update(job.id, 1, later, HOLDER, later + LEASE)
        assert changed
        assert (fell.status, fell.server_id, fell.fence) == (JobStatus.PAUSING, "s1", FENCE)
        assert fell.update_pending and fell.update_floor == job.generation
        assert fell.reason == "update not acknowledged in place: restarting"
        assert fell == await _get(storage, job.id)
        assert (job.id, job.generation) in await storage.held_jobs()
        # Once: a second fallback changes nothing; a late acknowledgement is refused.
        assert not (await storage.fall_back_update(job.id, 1, later, HOLDER, later))[1]
        assert not await storage.record_update_applied(job.id, "s1", FENCE, 1)
        confirmed = await _must(storage, job.id, JobEvent.CONFIRM_HELD, "s1", FENCE, later)
        assert (confirmed.status, confirmed.generation) == (JobStatus.PENDING, 2)
        assert confirmed.fence == make_fence(2, 0)
        assert (OutboxKind.PUBLISH, 2) in await _outbox_of(storage, job.id, now)

    async def test_owner_death_before_the_fallback_wins(self, storage: Storage) -> None:
        now = _now()
        (job,) = await _running(storage, now)
        await _in_place(storage, job, "new", now)
        await storage.expire_servers(now + _sec(1), now + _sec(1))
        released, changed = await storage.fall_back_update(job.id, 1, now, HOLDER, now + LEASE)
        assert not changed
        _republished(job, released, "new", "server dead")
        assert not await storage.record_update_applied(job.id, "s1", FENCE, 1)

    async def test_cancel_after_an_update_in_place_ends_cancelled(self, storage: Storage) -> None:
        now = _now()
        (job,) = await _running(storage, now)
        await _in_place(storage, job, "new", now)
        cancelled, changed = await storage.request_cancel(job.id, now, HOLDER, now + LEASE)
        assert changed and cancelled.status is JobStatus.DELETING
        assert await storage.request_update_in_place(job.id, "x", now, HOLDER, now) is None
        assert not (await storage.fall_back_update(job.id, 1, now, HOLDER, now))[1]
        # Its owner dies: it stays deleting, and nothing is republished.
        await storage.expire_servers(now + _sec(1), now + _sec(1))
        after = await _get(storage, job.id)
        assert (after.status, after.generation) == (JobStatus.DELETING, 1)
        assert (OutboxKind.PUBLISH, 2) not in await _outbox_of(storage, job.id, now)

    async def test_pause_after_an_update_in_place_ends_paused(self, storage: Storage) -> None:
        now = _now()
        (job,) = await _running(storage, now)
        await _in_place(storage, job, "new", now)
        paused, changed = await storage.request_pause(job.id, now, HOLDER, now + LEASE)
        assert changed and paused.status is JobStatus.PAUSING
        assert not (await storage.fall_back_update(job.id, 1, now, HOLDER, now))[1]
        # A release of a held job republishes nothing; its confirmation holds it.
        await storage.expire_servers(now + _sec(1), now + _sec(1))
        held = await _must(storage, job.id, JobEvent.CONFIRM_HELD, None, FENCE, now)
        assert (held.status, held.generation, held.argument) == (JobStatus.PAUSED, 1, "new")
        assert (OutboxKind.PUBLISH, 2) not in await _outbox_of(storage, job.id, now)
        resumed, changed = await storage.request_resume(job.id, now, HOLDER, now + LEASE)
        assert changed and (resumed.status, resumed.argument) == (JobStatus.PENDING, "new")

    async def test_a_copy_of_the_superseded_message_never_starts(self, storage: Storage) -> None:
        """The owner's connection drops and the broker hands the old message (old
        argument) to another server before its drop mark arrives: its start is
        refused, by a transition and by a heartbeat; the owner's own copy (which
        took the new argument) keeps reporting its fence."""
        now = _now()
        (job,) = await _running(storage, now)
        await _in_place(storage, job, "new", now)
        stray = make_fence(1, 2)
        assert not (await _apply(storage, job.id, JobEvent.START, "s2", stray, now)).applied
        refused = await storage.apply_heartbeat(_beat("s2", [job], now, fence=stray), now)
        assert [j.id for j in refused] == [job.id]
        later = now + _sec(HEARTBEAT_REFRESH_STEP + 1)  # a report that writes the row
        assert await storage.apply_heartbeat(_beat("s1", [job], later), later) == []
        owned = await _get(storage, job.id)
        assert (owned.status, owned.server_id, owned.fence, owned.argument) == (
            JobStatus.PROCESSING,
            "s1",
            FENCE,
            "new",
        )
        assert (await _apply(storage, job.id, JobEvent.START, "s1", FENCE, later)).applied
        # A message of a later generation is not covered.
        newer = await _must(storage, job.id, JobEvent.START, "s3", make_fence(2, 1), later)
        assert (newer.server_id, newer.fence) == ("s3", make_fence(2, 1))
