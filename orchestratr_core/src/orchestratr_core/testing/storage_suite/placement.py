"""Storage conformance, placement: job kinds, constraints, spread groups and
pending reasons; the kinds and labels of servers."""

from __future__ import annotations

import dataclasses

from orchestratr_core.job import JobEvent, JobQuery, ServerQuery
from orchestratr_core.placement import DEFAULT_KIND, Pool
from orchestratr_core.protocol import RunningJob
from orchestratr_core.storage import SpreadJob, Storage
from orchestratr_core.testing.storage_suite._common import (
    HOLDER,
    LEASE,
    _get,
    _heartbeat,
    _must,
    _new_job,
    _now,
)

__all__ = ["PlacementTests"]

_EU = Pool.of("feed", ["nic!=1g", "region=eu"])


async def _create_in(storage: Storage, pool: Pool, *, spread: str | None = None) -> str:
    job = dataclasses.replace(
        _new_job(), kind=pool.kind, constraints=pool.constraints, spread=spread
    )
    await storage.create_job(job, HOLDER, job.created_at + LEASE)
    return job.id


class PlacementTests:
    """Kinds, constraints, spread groups, pending reasons, server kinds and labels."""

    async def test_a_job_keeps_its_kind_constraints_and_spread_group(
        self, storage: Storage
    ) -> None:
        job_id = await _create_in(storage, _EU, spread="tenant-7")
        job = await _get(storage, job_id)
        assert (job.kind, job.constraints, job.spread) == (
            "feed",
            ("nic!=1g", "region=eu"),
            "tenant-7",
        )
        batch = [
            dataclasses.replace(_new_job(), kind="socket", constraints=("zone=a|b",)),
            _new_job(),
        ]
        try:
            records = await storage.create_jobs(batch, HOLDER, _now() + LEASE)
        except NotImplementedError:
            return  # create_jobs is optional
        assert [(r.kind, r.constraints) for r in records] == [
            ("socket", ("zone=a|b",)),
            (DEFAULT_KIND, ()),
        ]
        stored = await _get(storage, batch[0].id)
        assert (stored.kind, stored.constraints, stored.spread) == ("socket", ("zone=a|b",), None)

    async def test_a_job_created_without_a_kind_is_of_the_default_kind(
        self, storage: Storage
    ) -> None:
        job = _new_job()
        await storage.create_job(job, HOLDER, job.created_at + LEASE)
        stored = await _get(storage, job.id)
        assert (stored.kind, stored.constraints, stored.spread) == (DEFAULT_KIND, (), None)
        assert stored.pending_reason is None

    async def test_jobs_are_listed_by_kind(self, storage: Storage) -> None:
        feed = await _create_in(storage, _EU)
        await _create_in(storage, Pool.of("socket"))
        page = await storage.list_jobs(JobQuery(kind="feed"), with_total=True)
        assert [j.id for j in page.items] == [feed]
        assert page.total == 1

    async def test_pending_jobs_are_counted_by_pool_and_given_a_reason(
        self, storage: Storage
    ) -> None:
        now = _now()
        a = await _create_in(storage, _EU)
        b = await _create_in(storage, _EU)
        c = await _create_in(storage, Pool.of("socket"))
        d = await _create_in(storage, Pool.of("socket"))
        await _must(storage, d, JobEvent.START, "s1", 5, now)  # running: not pending
        assert await storage.pending_pools() == {_EU: 2, Pool.of("socket"): 1}
        reason = "waiting: no live server runs kind 'feed' with nic!=1g, region=eu"
        assert await storage.set_pending_reason(_EU, reason) == 2
        assert await storage.set_pending_reason(_EU, reason) == 0  # unchanged: no write
        assert (await _get(storage, a)).pending_reason == reason
        assert (await _get(storage, b)).pending_reason == reason
        assert (await _get(storage, c)).pending_reason is None
        assert await storage.set_pending_reason(Pool.of("socket"), "full") == 1
        assert (await _get(storage, d)).pending_reason is None  # not pending
        assert await storage.set_pending_reason(_EU, None) == 2
        assert (await _get(storage, a)).pending_reason is None

    async def test_running_jobs_are_counted_by_server_and_pool(self, storage: Storage) -> None:
        now = _now()
        jobs = [await _create_in(storage, _EU) for _ in range(3)]
        other = await _create_in(storage, Pool.of("socket"))
        await _must(storage, jobs[0], JobEvent.START, "s1", 5, now)
        await _must(storage, jobs[1], JobEvent.START, "s1", 5, now)
        await _must(storage, jobs[2], JobEvent.START, "s2", 5, now)
        await _must(storage, other, JobEvent.START, "s2", 5, now)
        assert await storage.count_running_by_pool() == {
            ("s1", _EU): 2,
            ("s2", _EU): 1,
            ("s2", Pool.of("socket")): 1,
        }

    async def test_running_jobs_of_spread_groups_are_listed_with_owner_pool_and_fence(
        self, storage: Storage
    ) -> None:
        now = _now()
        a = await _create_in(storage, _EU, spread="tenant-7")
        b = await _create_in(storage, Pool.of("socket"), spread="tenant-7")
        plain = await _create_in(storage, _EU)
        waiting = await _create_in(storage, _EU, spread="tenant-8")
        await _must(storage, a, JobEvent.START, "s1", 5, now)
        await _must(storage, b, JobEvent.START, "s2", 6, now)
        await _must(storage, plain, JobEvent.START, "s1", 7, now)
        listed = await storage.running_spread_jobs()
        assert sorted(listed, key=lambda j: j.job_id) == sorted(
            [
                SpreadJob(a, "s1", _EU, "tenant-7", 5),
                SpreadJob(b, "s2", Pool.of("socket"), "tenant-7", 6),
            ],
            key=lambda j: j.job_id,
        )
        assert waiting not in {j.job_id for j in listed}

    async def test_a_heartbeat_records_the_servers_kinds_and_labels(self, storage: Storage) -> None:
        now = _now()
        hb = dataclasses.replace(
            _heartbeat("s1", at=now), kinds=("socket", "feed"), labels=("nic=40g", "region=eu")
        )
        await storage.apply_heartbeat(hb, now)
        await storage.apply_heartbeat(_heartbeat("s2", at=now), now)  # an older server
        s1 = await storage.get_server("s1")
        s2 = await storage.get_server("s2")
        assert s1 is not None and s2 is not None
        assert (s1.kinds, s1.labels) == (("feed", "socket"), ("nic=40g", "region=eu"))
        assert (s2.kinds, s2.labels) == ((DEFAULT_KIND,), ())
        by_label = await storage.list_servers(ServerQuery(label="region=eu"))
        assert [s.id for s in by_label] == ["s1"]
        by_kind = await storage.list_servers(ServerQuery(kind=DEFAULT_KIND))
        assert [s.id for s in by_kind] == ["s2"]

    async def test_a_job_reported_running_keeps_its_placement(self, storage: Storage) -> None:
        now = _now()
        job_id = await _create_in(storage, _EU, spread="g")
        hb = _heartbeat("s1", [RunningJob(job_id, 9)], at=now)
        assert await storage.apply_heartbeat(hb, now) == []
        job = await _get(storage, job_id)
        assert (job.kind, job.constraints, job.spread) == ("feed", _EU.constraints, "g")
