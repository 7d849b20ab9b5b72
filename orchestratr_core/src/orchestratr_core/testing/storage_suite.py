"""The storage conformance suite: every clause of :class:`~orchestratr_core.storage.Storage`.

A backend author subclasses :class:`StorageConformance` in a test module and
provides an async fixture named ``storage`` that yields an *opened, empty*
storage (a fresh database or schema per test) and closes it afterwards. The
fixture must tolerate the test having closed the storage already (``close`` is
idempotent)::

    import pytest
    from orchestratr_core.testing import StorageConformance

    class TestMyStorage(StorageConformance):
        @pytest.fixture
        async def storage(self):
            s = MyStorage(url)
            await s.open()
            yield s
            await s.close()

The tests run with pytest-asyncio (``asyncio_mode = "auto"``, or decorate the
fixture with ``pytest_asyncio.fixture`` in strict mode). Times are compared with
a tolerance of one millisecond, so backends may round to milliseconds. Nothing
here sleeps: every time is passed to the storage explicitly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Iterable
from datetime import datetime, timedelta

import pytest

from orchestratr_core.client import OrchestratorClient
from orchestratr_core.errors import DataRejected, DuplicateJobName, InvalidJobInput, UnknownJob
from orchestratr_core.job import (
    MAX_ARGUMENT_BYTES,
    MAX_FENCE,
    MAX_NAME_LENGTH,
    TRANSITIONS,
    JobEvent,
    JobQuery,
    JobRecord,
    JobStatus,
    NewJob,
    ServerQuery,
    ServerRecord,
    ServerStatus,
    TransitionResult,
    clean_text,
    new_id,
    utcnow,
    validate_argument,
    validate_name,
)
from orchestratr_core.protocol import RunningJob, ServerHeartbeat
from orchestratr_core.storage import HEARTBEAT_REFRESH_STEP, OutboxItem, OutboxKind, Storage

__all__ = ["StorageConformance"]

HOLDER = "manager-a"
OTHER = "manager-b"
TOLERANCE = timedelta(milliseconds=1)
LEASE = timedelta(seconds=30)
FAR = timedelta(days=1)
STEP = timedelta(seconds=HEARTBEAT_REFRESH_STEP)

_CLIENT_EVENTS = [event for event in TRANSITIONS if event is not JobEvent.SERVER_LOST]


# -- helpers ------------------------------------------------------------------------------


def _now() -> datetime:
    """The current UTC time, truncated to whole milliseconds."""
    now = utcnow()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _sec(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def _same_time(actual: datetime | None, expected: datetime | None) -> bool:
    if actual is None or expected is None:
        return actual is expected
    assert actual.tzinfo is not None, f"naive datetime returned: {actual!r}"
    return abs(actual - expected) <= TOLERANCE


def _new_job(
    name: str | None = None,
    *,
    at: datetime | None = None,
    generation: int = 1,
    argument: str = '{"feed": 1}',
) -> NewJob:
    return NewJob(
        id=new_id(),
        name=name if name is not None else f"job-{new_id()[-12:]}",
        argument=argument,
        created_at=at if at is not None else _now(),
        generation=generation,
    )


async def _create(
    storage: Storage,
    name: str | None = None,
    *,
    at: datetime | None = None,
    generation: int = 1,
    lease: timedelta = LEASE,
) -> JobRecord:
    job = _new_job(name, at=at, generation=generation)
    return await storage.create_job(job, HOLDER, job.created_at + lease)


async def _create_many(
    storage: Storage, jobs: list[NewJob], lease_until: datetime
) -> list[JobRecord]:
    """``create_jobs``, or skip the test for a backend that does not implement
    the optional batch (its default raises NotImplementedError)."""
    try:
        return await storage.create_jobs(jobs, HOLDER, lease_until)
    except NotImplementedError:
        pytest.skip(f"{type(storage).__name__} does not implement the optional create_jobs")


async def _refused_batch(
    storage: Storage, jobs: list[NewJob], lease_until: datetime, accepted: str
) -> DuplicateJobName:
    """``create_jobs`` that must raise :class:`DuplicateJobName` (skipped for a
    backend without the optional batch); ``accepted`` says what went wrong if not."""
    try:
        await storage.create_jobs(jobs, HOLDER, lease_until)
    except NotImplementedError:
        pytest.skip(f"{type(storage).__name__} does not implement the optional create_jobs")
    except DuplicateJobName as caught:
        return caught
    pytest.fail(accepted)


async def _get(storage: Storage, job_id: str) -> JobRecord:
    job = await storage.get_job(job_id)
    assert job is not None, f"job {job_id} vanished"
    return job


def _job(result: TransitionResult) -> JobRecord:
    assert result.job is not None, "the transition reported no job for a known id"
    return result.job


async def _apply(
    storage: Storage,
    job_id: str,
    event: JobEvent,
    server: str | None,
    fence: int,
    now: datetime,
    **extra: object,
) -> TransitionResult:
    return await storage.transition(
        job_id,
        event,
        server_id=server,
        fence=fence,
        now=now,
        **extra,  # type: ignore[arg-type]
    )


async def _must(
    storage: Storage,
    job_id: str,
    event: JobEvent,
    server: str | None,
    fence: int,
    now: datetime,
) -> JobRecord:
    result = await _apply(storage, job_id, event, server, fence, now)
    assert result.applied, f"setup step {event.value} was refused: {result.job}"
    return _job(result)


async def _in_status(
    storage: Storage,
    status: JobStatus,
    now: datetime,
    *,
    server: str = "s1",
    fence: int = 7,
    name: str | None = None,
) -> JobRecord:
    """A job in ``status``; owned by ``server`` with ``fence`` while processing or
    deleting, unowned with that fence otherwise (pending after a release)."""
    job = await _create(storage, name, at=now)
    await _must(storage, job.id, JobEvent.START, server, fence, now)
    if status is JobStatus.PROCESSING:
        return await _get(storage, job.id)
    if status is JobStatus.PENDING:
        return await _must(storage, job.id, JobEvent.RELEASE, server, fence, now)
    if status is JobStatus.COMPLETED:
        return await _must(storage, job.id, JobEvent.COMPLETE, server, fence, now)
    cancelled, changed = await storage.request_cancel(job.id, now, HOLDER, now + LEASE)
    assert changed
    if status is JobStatus.DELETING:
        return cancelled
    return await _must(storage, job.id, JobEvent.CONFIRM_DELETED, server, fence, now)


def _heartbeat(
    server_id: str,
    jobs: Iterable[RunningJob] = (),
    *,
    at: datetime,
    name: str | None = None,
    draining: bool = False,
    max_workers: int = 4,
    host: str = "host-1",
    pid: int = 4242,
    started_at: datetime | None = None,
) -> ServerHeartbeat:
    started = started_at if started_at is not None else at - _sec(600)
    return ServerHeartbeat(
        server_id=server_id,
        name=name if name is not None else f"name-{server_id}",
        max_workers=max_workers,
        started_at=started.timestamp(),
        sent_at=at.timestamp(),
        host=host,
        pid=pid,
        draining=draining,
        jobs=tuple(jobs),
    )


async def _all_outbox(storage: Storage, at: datetime) -> list[OutboxItem]:
    """Every outbox row, claimed by a third holder long after every lease ended."""
    return await storage.claim_outbox("auditor", at + FAR, at + 2 * FAR, 10_000)


async def _page_ids(storage: Storage, query: JobQuery) -> list[str]:
    return [job.id for job in (await storage.list_jobs(query)).items]


def _ids(records: Iterable[JobRecord | ServerRecord]) -> list[str]:
    return [record.id for record in records]


# -- the suite ----------------------------------------------------------------------------


class StorageConformance:
    """Conformance tests of the :class:`~orchestratr_core.storage.Storage` contract.

    Subclass as ``Test...`` and provide an async ``storage`` fixture yielding an
    opened, empty storage. See the module docstring.
    """

    pytestmark = [pytest.mark.conformance]

    # -- create_job ---------------------------------------------------------------------

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
            *(storage.create_job(job, HOLDER, now + LEASE) for job in jobs),
            return_exceptions=True,
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

    # -- create_jobs (optional: skipped where the default NotImplementedError stays) ----

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

    # -- request_cancel -------------------------------------------------------------------

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

    # -- transition: the state machine, row by row ---------------------------------------

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
        assert after.status is (rule.target if rule.target is not None else status)
        assert after.fence == 7
        assert _same_time(after.updated_at, later)
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

    # -- apply_heartbeat ---------------------------------------------------------------

    async def test_heartbeat_registers_the_server(self, storage: Storage) -> None:
        now = _now()
        started = now - _sec(120)
        hb = _heartbeat(
            "s1", at=now, name="worker-a", max_workers=8, host="h", pid=99, started_at=started
        )
        assert await storage.apply_heartbeat(hb, now) == []
        server = await storage.get_server("s1")
        assert server is not None
        assert (server.name, server.max_workers, server.host, server.pid) == (
            "worker-a",
            8,
            "h",
            99,
        )
        assert server.status is ServerStatus.ALIVE
        assert _same_time(server.started_at, started)
        assert _same_time(server.last_seen, now)
        assert server.running == ()

    async def test_heartbeat_updates_the_server_and_reports_draining(
        self, storage: Storage
    ) -> None:
        now = _now()
        await storage.apply_heartbeat(_heartbeat("s1", at=now, max_workers=2), now)
        later = now + _sec(5)
        await storage.apply_heartbeat(
            _heartbeat("s1", at=later, max_workers=3, draining=True), later
        )
        server = await storage.get_server("s1")
        assert server is not None
        assert server.status is ServerStatus.DRAINING
        assert server.max_workers == 3
        assert _same_time(server.last_seen, later)

    async def test_a_requested_drain_is_not_undone_by_the_next_heartbeat(
        self, storage: Storage
    ) -> None:
        now = _now()
        await storage.apply_heartbeat(_heartbeat("s1", at=now), now)
        assert await storage.set_server_status("s1", ServerStatus.DRAINING, now)
        later = now + _sec(1)
        await storage.apply_heartbeat(_heartbeat("s1", at=later), later)
        server = await storage.get_server("s1")
        assert server is not None
        assert server.status is ServerStatus.DRAINING

    async def test_heartbeat_starts_the_reported_jobs_with_their_fence_and_heartbeat(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _create(storage, at=now)
        beat = now - _sec(2)
        hb = _heartbeat(
            "s1", [RunningJob(job.id, 12, last_heartbeat=beat.timestamp(), restarts=2)], at=now
        )
        assert await storage.apply_heartbeat(hb, now) == []
        running = await _get(storage, job.id)
        assert running.status is JobStatus.PROCESSING
        assert (running.server_id, running.fence, running.restarts) == ("s1", 12, 2)
        assert _same_time(running.last_heartbeat, beat)
        assert _same_time(running.started_at, now)
        server = await storage.get_server("s1")
        assert server is not None
        assert _ids(server.running) == [job.id]

    async def test_heartbeat_refreshes_jobs_the_server_already_owns(self, storage: Storage) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        later = now + STEP + _sec(1)  # older than the refresh step: must be rewritten
        hb = _heartbeat("s1", [RunningJob(job.id, 7, last_heartbeat=later.timestamp())], at=later)
        assert await storage.apply_heartbeat(hb, later) == []
        refreshed = await _get(storage, job.id)
        assert (refreshed.status, refreshed.server_id, refreshed.fence) == (
            JobStatus.PROCESSING,
            "s1",
            7,
        )
        assert _same_time(refreshed.started_at, now)
        assert _same_time(refreshed.last_heartbeat, later)

    async def test_heartbeat_within_the_refresh_step_keeps_the_job_and_applies_changes(
        self, storage: Storage
    ) -> None:
        now = _now()
        same = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        restarted = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        later = now + STEP / 2
        reported = [
            RunningJob(same.id, 7, last_heartbeat=later.timestamp()),
            RunningJob(restarted.id, 7, last_heartbeat=later.timestamp(), restarts=3),
        ]
        assert await storage.apply_heartbeat(_heartbeat("s1", reported, at=later), later) == []
        kept = await _get(storage, same.id)
        assert (kept.status, kept.server_id, kept.fence) == (JobStatus.PROCESSING, "s1", 7)
        # The backend may skip rewriting it (the step) or refresh it: both are right.
        assert _same_time(kept.last_heartbeat, now) or _same_time(kept.last_heartbeat, later)
        assert _same_time(kept.started_at, now)
        changed = await _get(storage, restarted.id)
        assert changed.restarts == 3  # a change is always written
        assert _same_time(changed.last_heartbeat, later)
        server = await storage.get_server("s1")
        assert server is not None and sorted(_ids(server.running)) == sorted(
            [same.id, restarted.id]
        )

    async def test_heartbeat_returns_the_jobs_that_refused_the_report(
        self, storage: Storage
    ) -> None:
        now = _now()
        newer = await _in_status(storage, JobStatus.PROCESSING, now, server="s2", fence=9)
        equal = await _in_status(storage, JobStatus.PROCESSING, now, server="s2", fence=5)
        stale = await _in_status(storage, JobStatus.PENDING, now, server="s2", fence=9)
        deleting = await _create(storage, at=now)
        deleting, _ = await storage.request_cancel(deleting.id, now, HOLDER, now + LEASE)
        deleted = await _in_status(storage, JobStatus.DELETED, now, server="s2")
        completed = await _in_status(storage, JobStatus.COMPLETED, now, server="s2")
        accepted = await _create(storage, at=now)
        refused_jobs = [newer, equal, stale, deleting, deleted, completed]
        reported = [RunningJob(job.id, 5) for job in [*refused_jobs, accepted]]
        reported.append(RunningJob(new_id(), 5))  # unknown to the storage: left out
        later = now + _sec(1)
        refused = await storage.apply_heartbeat(_heartbeat("s1", reported, at=later), later)
        assert sorted(_ids(refused)) == sorted(_ids(refused_jobs))
        by_id = {job.id: job for job in refused}
        for job in refused_jobs:
            assert by_id[job.id] == job
            assert await storage.get_job(job.id) == job
        assert (await _get(storage, accepted.id)).server_id == "s1"

    async def test_heartbeat_hands_back_the_jobs_the_server_no_longer_reports(
        self, storage: Storage
    ) -> None:
        now = _now()
        kept = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=1)
        dropped = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=2)
        cancelling = await _in_status(storage, JobStatus.DELETING, now, server="s1", fence=3)
        elsewhere = await _in_status(storage, JobStatus.PROCESSING, now, server="s2", fence=4)
        later = now + _sec(5)
        hb = _heartbeat("s1", [RunningJob(kept.id, 1)], at=later)
        assert await storage.apply_heartbeat(hb, later) == []
        after_dropped = await _get(storage, dropped.id)
        assert after_dropped.status is JobStatus.PENDING
        assert (after_dropped.server_id, after_dropped.fence) == (None, 2)
        assert after_dropped.reason
        after_cancelling = await _get(storage, cancelling.id)
        assert after_cancelling.status is JobStatus.DELETING
        assert (after_cancelling.server_id, after_cancelling.fence) == (None, 3)
        assert await storage.get_job(elsewhere.id) == elsewhere
        assert (await _get(storage, kept.id)).server_id == "s1"
        server = await storage.get_server("s1")
        assert server is not None
        assert _ids(server.running) == [kept.id]

    async def test_heartbeat_brings_a_dead_or_left_server_back_alive(
        self, storage: Storage
    ) -> None:
        now = _now()
        await storage.apply_heartbeat(_heartbeat("s1", at=now), now)
        await storage.apply_heartbeat(_heartbeat("s2", at=now), now)
        assert len(await storage.expire_servers(now + _sec(1), now + _sec(2))) == 2
        assert await storage.server_left("s2", now + _sec(2))
        later = now + _sec(60)
        for server_id in ("s1", "s2"):
            await storage.apply_heartbeat(_heartbeat(server_id, at=later), later)
            server = await storage.get_server(server_id)
            assert server is not None
            assert server.status is ServerStatus.ALIVE
            assert _same_time(server.last_seen, later)

    async def test_heartbeat_with_many_jobs_applies_them_all(self, storage: Storage) -> None:
        now = _now()
        jobs = [await _create(storage, at=now) for _ in range(200)]
        hb = _heartbeat("s1", [RunningJob(job.id, 1) for job in jobs], at=now)
        assert await storage.apply_heartbeat(hb, now) == []
        page = await storage.list_jobs(
            JobQuery(statuses=frozenset({JobStatus.PROCESSING}), server_id="s1", limit=None)
        )
        assert sorted(_ids(page.items)) == sorted(_ids(jobs))

    # -- expire_servers and server_left ----------------------------------------------

    async def test_expire_servers_marks_silent_servers_dead_and_hands_back_their_jobs(
        self, storage: Storage
    ) -> None:
        t0 = _now()
        running = await _create(storage, at=t0)
        cancelling = await _create(storage, at=t0)
        fresh_job = await _create(storage, at=t0)
        hb_old = _heartbeat("old", [RunningJob(running.id, 3), RunningJob(cancelling.id, 4)], at=t0)
        await storage.apply_heartbeat(hb_old, t0)
        await storage.request_cancel(cancelling.id, t0, HOLDER, t0 + LEASE)
        await storage.apply_heartbeat(_heartbeat("draining", at=t0, draining=True), t0)
        await storage.apply_heartbeat(_heartbeat("gone", at=t0), t0)
        await storage.server_left("gone", t0)
        fresh_at = t0 + _sec(20)
        hb_fresh = _heartbeat("fresh", [RunningJob(fresh_job.id, 1)], at=fresh_at)
        await storage.apply_heartbeat(hb_fresh, fresh_at)

        now = t0 + _sec(30)
        expired = await storage.expire_servers(t0 + _sec(10), now)
        assert sorted(_ids(expired)) == ["draining", "old"]
        assert all(server.status is ServerStatus.DEAD for server in expired)
        for server_id, status in (
            ("old", ServerStatus.DEAD),
            ("draining", ServerStatus.DEAD),
            ("gone", ServerStatus.LEFT),
            ("fresh", ServerStatus.ALIVE),
        ):
            server = await storage.get_server(server_id)
            assert server is not None
            assert server.status is status, server_id
        after_running = await _get(storage, running.id)
        assert after_running.status is JobStatus.PENDING
        assert (after_running.server_id, after_running.fence) == (None, 3)
        assert _same_time(after_running.updated_at, now)
        after_cancelling = await _get(storage, cancelling.id)
        assert after_cancelling.status is JobStatus.DELETING
        assert (after_cancelling.server_id, after_cancelling.fence) == (None, 4)
        assert (await _get(storage, fresh_job.id)).server_id == "fresh"
        assert await storage.expire_servers(t0 + _sec(10), now + _sec(1)) == []

    async def test_server_left_marks_the_server_and_hands_back_its_jobs(
        self, storage: Storage
    ) -> None:
        now = _now()
        assert not await storage.server_left("nobody", now)
        running = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=2)
        cancelling = await _in_status(storage, JobStatus.DELETING, now, server="s1", fence=3)
        other = await _in_status(storage, JobStatus.PROCESSING, now, server="s2", fence=4)
        hb = _heartbeat("s1", [RunningJob(running.id, 2), RunningJob(cancelling.id, 3)], at=now)
        await storage.apply_heartbeat(hb, now)
        later = now + _sec(1)
        assert await storage.server_left("s1", later)
        server = await storage.get_server("s1")
        assert server is not None
        assert server.status is ServerStatus.LEFT
        assert server.running == ()
        after_running = await _get(storage, running.id)
        assert (after_running.status, after_running.server_id, after_running.fence) == (
            JobStatus.PENDING,
            None,
            2,
        )
        after_cancelling = await _get(storage, cancelling.id)
        assert (after_cancelling.status, after_cancelling.server_id) == (JobStatus.DELETING, None)
        assert await storage.get_job(other.id) == other

    async def test_set_server_status(self, storage: Storage) -> None:
        now = _now()
        assert not await storage.set_server_status("nobody", ServerStatus.DRAINING, now)
        await storage.apply_heartbeat(_heartbeat("s1", at=now), now)
        assert await storage.set_server_status("s1", ServerStatus.DRAINING, now)
        server = await storage.get_server("s1")
        assert server is not None
        assert server.status is ServerStatus.DRAINING

    # -- outbox -------------------------------------------------------------------

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

    # -- leases ----------------------------------------------------------------

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

    # -- cancelled_job_ids ---------------------------------------------------------------

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

    # -- get_job, get_jobs ---------------------------------------------------------------

    async def test_get_job_returns_any_status_and_none_for_an_unknown_id(
        self, storage: Storage
    ) -> None:
        now = _now()
        assert await storage.get_job(new_id()) is None
        for status in JobStatus:
            job = await _in_status(storage, status, now)
            assert await storage.get_job(job.id) == job

    async def test_get_jobs_returns_the_known_ones(self, storage: Storage) -> None:
        now = _now()
        jobs = [await _create(storage, at=now) for _ in range(4)]
        deleted = await _in_status(storage, JobStatus.DELETED, now)
        wanted = [jobs[2].id, new_id(), jobs[0].id, deleted.id]
        found = await storage.get_jobs(wanted)
        assert sorted(_ids(found)) == sorted([jobs[2].id, jobs[0].id, deleted.id])
        assert {job.id: job for job in found}[jobs[2].id] == jobs[2]
        assert await storage.get_jobs([]) == []

    # -- list_jobs --------------------------------------------------------------------

    async def test_list_jobs_of_an_empty_storage(self, storage: Storage) -> None:
        page = await storage.list_jobs(JobQuery(), with_total=True)
        assert page.items == ()
        assert page.next_cursor is None
        assert page.total == 0

    async def test_keyset_paging_returns_every_job_once_in_id_order(self, storage: Storage) -> None:
        now = _now()
        ids = sorted(_ids([await _create(storage, at=now) for _ in range(25)]))
        await self._assert_pages(storage, ids, limit=7)

    async def test_keyset_paging_ends_when_the_last_page_is_exactly_full(
        self, storage: Storage
    ) -> None:
        now = _now()
        ids = sorted(_ids([await _create(storage, at=now) for _ in range(21)]))
        await self._assert_pages(storage, ids, limit=7)

    @staticmethod
    async def _assert_pages(storage: Storage, ids: list[str], *, limit: int) -> None:
        seen: list[str] = []
        cursor: str | None = None
        for _ in range(len(ids) // limit + 3):
            page = await storage.list_jobs(JobQuery(after=cursor, limit=limit))
            assert len(page.items) <= limit
            if not page.items:
                assert page.next_cursor is None, "an empty page must end the listing"
            if len(page.items) < limit:
                assert page.next_cursor is None, "a short page must end the listing"
            if page.next_cursor is not None:
                assert page.next_cursor == page.items[-1].id
            seen.extend(_ids(page.items))
            cursor = page.next_cursor
            if cursor is None:
                break
        else:
            pytest.fail("paging never ended")
        assert seen == ids

    async def test_list_jobs_offset_counts_after_the_cursor(self, storage: Storage) -> None:
        now = _now()
        ids = sorted(_ids([await _create(storage, at=now) for _ in range(10)]))
        assert await _page_ids(storage, JobQuery(offset=3, limit=4)) == ids[3:7]
        assert await _page_ids(storage, JobQuery(after=ids[1], offset=2, limit=3)) == ids[4:7]
        assert await _page_ids(storage, JobQuery(offset=10, limit=3)) == []

    async def test_list_jobs_without_a_limit_returns_every_match(self, storage: Storage) -> None:
        now = _now()
        ids = sorted(_ids([await _create(storage, at=now) for _ in range(150)]))
        page = await storage.list_jobs(JobQuery(limit=None))
        assert _ids(page.items) == ids
        assert page.next_cursor is None
        assert await _page_ids(storage, JobQuery(after=ids[99], limit=None)) == ids[100:]

    async def test_list_jobs_total_counts_every_match_regardless_of_paging(
        self, storage: Storage
    ) -> None:
        now = _now()
        ids = sorted(_ids([await _create(storage, at=now) for _ in range(12)]))
        await _in_status(storage, JobStatus.DELETED, now)
        page = await storage.list_jobs(JobQuery(after=ids[2], offset=1, limit=3), with_total=True)
        assert _ids(page.items) == ids[4:7]
        assert page.total == 12
        everything = await storage.list_jobs(JobQuery(include_deleted=True), with_total=True)
        assert everything.total == 13

    async def test_list_jobs_leaves_deleted_jobs_out_unless_asked(self, storage: Storage) -> None:
        now = _now()
        jobs = {status: await _in_status(storage, status, now) for status in JobStatus}
        live = await _page_ids(storage, JobQuery())
        assert sorted(live) == sorted(
            job.id for status, job in jobs.items() if status is not JobStatus.DELETED
        )
        every = await _page_ids(storage, JobQuery(include_deleted=True))
        assert sorted(every) == sorted(job.id for job in jobs.values())

    async def test_list_jobs_filters_by_a_set_of_statuses(self, storage: Storage) -> None:
        now = _now()
        jobs = {status: await _in_status(storage, status, now) for status in JobStatus}
        for wanted in (
            {JobStatus.PENDING},
            {JobStatus.PROCESSING, JobStatus.DELETING},
            {JobStatus.DELETED, JobStatus.COMPLETED},
            set(JobStatus),
        ):
            page = await storage.list_jobs(JobQuery(statuses=frozenset(wanted)), with_total=True)
            assert sorted(_ids(page.items)) == sorted(jobs[s].id for s in wanted), wanted
            assert page.total == len(wanted)

    async def test_list_jobs_name_prefix_is_literal(self, storage: Storage) -> None:
        now = _now()
        names = ["50%-off", "50-off", "5000", "a_b", "axb", "ab", "a\\b", "[x]y", "xy", "Ab"]
        ids = {name: (await _create(storage, name, at=now)).id for name in names}

        async def matching(prefix: str) -> list[str]:
            page = await storage.list_jobs(JobQuery(name_prefix=prefix, limit=None))
            return sorted(job.name for job in page.items)

        assert await matching("50%") == ["50%-off"]
        assert await matching("a_") == ["a_b"]
        assert await matching("a\\") == ["a\\b"]
        assert await matching("[x]") == ["[x]y"]
        assert await matching("a") == sorted(["a_b", "axb", "ab", "a\\b"])
        assert await matching("%") == []
        assert await matching("") == sorted(names)
        page = await storage.list_jobs(JobQuery(name_prefix="50"), with_total=True)
        assert sorted(_ids(page.items)) == sorted(ids[n] for n in ("50%-off", "50-off", "5000"))
        assert page.total == 3

    async def test_list_jobs_filters_by_server(self, storage: Storage) -> None:
        now = _now()
        on_s1 = [await _in_status(storage, JobStatus.PROCESSING, now, server="s1") for _ in "ab"]
        cancelling = await _in_status(storage, JobStatus.DELETING, now, server="s1")
        await _in_status(storage, JobStatus.PROCESSING, now, server="s2")
        await _create(storage, at=now)
        page = await storage.list_jobs(JobQuery(server_id="s1"), with_total=True)
        assert sorted(_ids(page.items)) == sorted(_ids([*on_s1, cancelling]))
        assert page.total == 3
        assert await _page_ids(storage, JobQuery(server_id="nobody")) == []

    async def test_list_jobs_combines_filters(self, storage: Storage) -> None:
        now = _now()
        match = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", name="feed-1")
        await _in_status(storage, JobStatus.PROCESSING, now, server="s2", name="feed-2")
        await _in_status(storage, JobStatus.DELETING, now, server="s1", name="feed-3")
        await _in_status(storage, JobStatus.PROCESSING, now, server="s1", name="poll-1")
        query = JobQuery(
            statuses=frozenset({JobStatus.PROCESSING}), name_prefix="feed", server_id="s1"
        )
        page = await storage.list_jobs(query, with_total=True)
        assert _ids(page.items) == [match.id]
        assert page.total == 1

    async def test_filtered_keyset_paging_returns_every_match_once(self, storage: Storage) -> None:
        now = _now()
        wanted: list[str] = []
        for i in range(30):
            job = await _create(storage, f"{'keep' if i % 3 else 'skip'}-{i}", at=now)
            if i % 3:
                wanted.append(job.id)
        seen: list[str] = []
        cursor: str | None = None
        for _ in range(30):
            page = await storage.list_jobs(JobQuery(name_prefix="keep", after=cursor, limit=4))
            seen.extend(_ids(page.items))
            cursor = page.next_cursor
            if cursor is None:
                break
        assert seen == sorted(wanted)

    # -- list_servers, get_server --------------------------------------------------------

    async def test_list_servers_filters_orders_and_fills_running_jobs(
        self, storage: Storage
    ) -> None:
        now = _now()
        running = await _create(storage, at=now)
        cancelling = await _create(storage, at=now)
        for server_id, name in (("s-b", "b"), ("s-a2", "a"), ("s-a1", "a"), ("s-c", "c")):
            await storage.apply_heartbeat(_heartbeat(server_id, at=now, name=name), now)
        hb = _heartbeat(
            "s-a2", [RunningJob(running.id, 1), RunningJob(cancelling.id, 1)], at=now, name="a"
        )
        await storage.apply_heartbeat(hb, now)
        await storage.request_cancel(cancelling.id, now, HOLDER, now + LEASE)
        done = await _in_status(storage, JobStatus.COMPLETED, now, server="s-a2")
        await storage.apply_heartbeat(_heartbeat("s-d", at=now, name="d"), now)
        await storage.server_left("s-d", now)
        await storage.apply_heartbeat(_heartbeat("s-e", at=now - _sec(100), name="e"), now)
        await storage.expire_servers(now, now)  # nothing: every last_seen is now
        assert await storage.set_server_status("s-c", ServerStatus.DEAD, now)

        live = await storage.list_servers(ServerQuery())
        assert _ids(live) == ["s-a1", "s-a2", "s-b", "s-e"]
        by_id = {server.id: server for server in live}
        assert sorted(_ids(by_id["s-a2"].running)) == sorted([running.id, cancelling.id])
        assert done.id not in _ids(by_id["s-a2"].running)
        assert by_id["s-a1"].running == ()
        every = await storage.list_servers(ServerQuery(statuses=None))
        assert _ids(every) == ["s-a1", "s-a2", "s-b", "s-c", "s-d", "s-e"]
        dead = await storage.list_servers(ServerQuery(statuses=frozenset({ServerStatus.DEAD})))
        assert _ids(dead) == ["s-c"]
        named = await storage.list_servers(ServerQuery(name_prefix="a", with_jobs=False))
        assert _ids(named) == ["s-a1", "s-a2"]
        assert all(server.running == () for server in named)

    async def test_get_server_returns_it_with_its_running_jobs(self, storage: Storage) -> None:
        now = _now()
        assert await storage.get_server("nobody") is None
        jobs = [await _create(storage, at=now) for _ in range(3)]
        hb = _heartbeat("s1", [RunningJob(job.id, 1) for job in jobs], at=now)
        await storage.apply_heartbeat(hb, now)
        await _must(storage, jobs[0].id, JobEvent.RELEASE, "s1", 1, now)
        server = await storage.get_server("s1")
        assert server is not None
        assert sorted(_ids(server.running)) == sorted(_ids(jobs[1:]))
        assert all(job.status is JobStatus.PROCESSING for job in server.running)
        assert server.to_dict()["jobs"]

    async def test_count_running_by_server_counts_processing_jobs_per_server(
        self, storage: Storage
    ) -> None:
        now = _now()
        assert await storage.count_running_by_server() == {}
        on_s1 = [await _create(storage, at=now) for _ in range(3)]
        on_s2 = await _create(storage, at=now)
        await storage.apply_heartbeat(
            _heartbeat("s1", [RunningJob(job.id, 1) for job in on_s1], at=now), now
        )
        await storage.apply_heartbeat(_heartbeat("s2", [RunningJob(on_s2.id, 1)], at=now), now)
        await storage.apply_heartbeat(_heartbeat("s3", at=now), now)  # runs nothing
        await _in_status(storage, JobStatus.DELETING, now, server="s1")  # not counted
        await _in_status(storage, JobStatus.COMPLETED, now, server="s2")
        await _create(storage, at=now)  # pending
        assert await storage.count_running_by_server() == {"s1": 3, "s2": 1}
        await _must(storage, on_s1[0].id, JobEvent.RELEASE, "s1", 1, now)
        await storage.server_left("s2", now)
        assert await storage.count_running_by_server() == {"s1": 2}

    # -- lifecycle and types ---------------------------------------------------------

    async def test_returned_times_are_timezone_aware(self, storage: Storage) -> None:
        now = _now()
        job = await _create(storage, at=now)
        await storage.apply_heartbeat(_heartbeat("s1", [RunningJob(job.id, 1)], at=now), now)
        stored = await _get(storage, job.id)
        server = await storage.get_server("s1")
        assert server is not None
        for value in (
            stored.created_at,
            stored.updated_at,
            stored.started_at,
            stored.last_heartbeat,
            server.started_at,
            server.last_seen,
        ):
            assert value is not None
            assert value.utcoffset() == timedelta(0)

    # -- hostile input (issue 11) --------------------------------------------------

    async def test_every_name_and_argument_the_core_accepts_is_stored_exactly(
        self, storage: Storage
    ) -> None:
        now = _now()
        odd = (
            "".join(chr(c) for c in range(1, 32)) + "\x7f\u2028\ufeff\uffff \U0001f600 \u00e9\u0301"
        )
        texts = [
            ("na\u00efve \u65e5\u672c \U0001f600 x", odd),
            ("\U0001f600" * MAX_NAME_LENGTH, "\U0001f600" * (MAX_ARGUMENT_BYTES // 4)),
        ]
        for name, argument in texts:
            job = _new_job(validate_name(name), at=now, argument=validate_argument(argument))
            await storage.create_job(job, HOLDER, now + LEASE)
            stored = await _get(storage, job.id)
            assert (stored.name, stored.argument) == (name, argument)

    async def test_nul_in_a_name_or_argument_is_refused_before_any_storage_sees_it(
        self, storage: Storage
    ) -> None:
        client = OrchestratorClient(storage)
        for name, argument in (("bad\x00name", ""), ("nul-argument", "bad \x00 byte")):
            with pytest.raises(InvalidJobInput, match=r"U\+0000|NUL"):
                await client.create_job(name, argument)
        with pytest.raises(InvalidJobInput, match="NUL"):
            await client.create_jobs([("fine", "x"), ("nul-in-batch", "\x00")])
        assert (await storage.list_jobs(JobQuery(include_deleted=True))).items == ()

    async def test_an_error_text_cleaned_by_the_core_is_stored_exactly(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        error = clean_text("ValueError: bad \x00 byte \ud800 \u2603 " + "x" * 5000)
        assert "\x00" not in error and len(error) <= 2000
        result = await _apply(storage, job.id, JobEvent.FAIL, "s1", 7, now, error=error, restarts=1)
        assert result.applied
        assert (await _get(storage, job.id)).last_error == error

    async def test_a_fence_beyond_63_bits_is_data_rejected_and_changes_nothing(
        self, storage: Storage
    ) -> None:
        now = _now()
        job = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=7)
        with pytest.raises(DataRejected):
            await _apply(storage, job.id, JobEvent.START, "s2", MAX_FENCE + 1, now + _sec(1))
        hb = _heartbeat("s3", [RunningJob(job.id, MAX_FENCE + 1)], at=now + _sec(2))
        with pytest.raises(DataRejected):
            await storage.apply_heartbeat(hb, now + _sec(2))
        after = await _get(storage, job.id)
        assert (after.status, after.server_id, after.fence) == (JobStatus.PROCESSING, "s1", 7)
        assert await storage.get_server("s3") is None
        # The largest fence is an ordinary one.
        taken = _job(await _apply(storage, job.id, JobEvent.START, "s2", MAX_FENCE, now))
        assert (taken.server_id, taken.fence) == ("s2", MAX_FENCE)

    async def test_close_is_idempotent(self, storage: Storage) -> None:
        await _create(storage)
        await storage.close()
        await storage.close()
