"""Constants and helpers shared by the storage conformance mixins."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

import pytest

from orchestratr_core.errors import DuplicateJobName
from orchestratr_core.job import (
    TRANSITIONS,
    JobEvent,
    JobQuery,
    JobRecord,
    JobStatus,
    NewJob,
    ServerRecord,
    TransitionResult,
    new_id,
    utcnow,
)
from orchestratr_core.protocol import RunningJob, ServerHeartbeat
from orchestratr_core.storage import HEARTBEAT_REFRESH_STEP, OutboxItem, Storage

HOLDER = "manager-a"
OTHER = "manager-b"
TOLERANCE = timedelta(milliseconds=1)
LEASE = timedelta(seconds=30)
FAR = timedelta(days=1)
STEP = timedelta(seconds=HEARTBEAT_REFRESH_STEP)

_CLIENT_EVENTS = [
    event for event in TRANSITIONS if event not in (JobEvent.SERVER_LOST, JobEvent.RESUME)
]
"""The events :meth:`Storage.transition` applies (``RESUME`` is ``request_resume``'s)."""


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
    storage: Storage, job_id: str, event: JobEvent, server: str | None, fence: int, now: datetime
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
    """A job in ``status``; owned by ``server`` with ``fence`` while processing,
    deleting, pausing or quarantined, unowned with that fence otherwise (pending
    after a release, paused after a confirmed pause)."""
    job = await _create(storage, name, at=now)
    await _must(storage, job.id, JobEvent.START, server, fence, now)
    if status is JobStatus.PROCESSING:
        return await _get(storage, job.id)
    if status is JobStatus.PENDING:
        return await _must(storage, job.id, JobEvent.RELEASE, server, fence, now)
    if status is JobStatus.COMPLETED:
        return await _must(storage, job.id, JobEvent.COMPLETE, server, fence, now)
    if status is JobStatus.QUARANTINED:
        return await _must(storage, job.id, JobEvent.QUARANTINE, server, fence, now)
    if status in (JobStatus.PAUSING, JobStatus.PAUSED):
        pausing, changed = await storage.request_pause(job.id, now, HOLDER, now + LEASE)
        assert changed
        if status is JobStatus.PAUSING:
            return pausing
        return await _must(storage, job.id, JobEvent.CONFIRM_HELD, server, fence, now)
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
