"""Storage conformance, lifecycle, types and hostile input."""

from __future__ import annotations

from datetime import timedelta

import pytest

from orchestratr_core.client import OrchestratorClient
from orchestratr_core.errors import DataRejected, InvalidJobInput
from orchestratr_core.job import (
    MAX_ARGUMENT_BYTES,
    MAX_FENCE,
    MAX_NAME_LENGTH,
    JobEvent,
    JobQuery,
    JobStatus,
    clean_text,
    validate_argument,
    validate_name,
)
from orchestratr_core.protocol import RunningJob
from orchestratr_core.storage import Storage
from orchestratr_core.testing.storage_suite._common import (
    HOLDER,
    LEASE,
    _apply,
    _create,
    _get,
    _heartbeat,
    _in_status,
    _job,
    _new_job,
    _now,
    _sec,
)

__all__ = ["HostileInputTests", "LifecycleTests"]


class LifecycleTests:
    """Lifecycle and types."""

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

    async def test_close_is_idempotent(self, storage: Storage) -> None:
        await _create(storage)
        await storage.close()
        await storage.close()


class HostileInputTests:
    """Hostile input: text at the limits, NUL, cleaned error texts, fences beyond 63 bits."""

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
