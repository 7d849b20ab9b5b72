"""Storage conformance, reading jobs: by id and by page."""

from __future__ import annotations

import pytest

from orchestratr_core.job import JobQuery, JobStatus, new_id
from orchestratr_core.storage import Storage
from orchestratr_core.testing.storage_suite._common import (
    _create,
    _ids,
    _in_status,
    _now,
    _page_ids,
)

__all__ = ["GetJobTests", "ListJobsTests"]


class GetJobTests:
    """``get_job``, ``get_jobs``."""

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


class ListJobsTests:
    """``list_jobs``."""

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
