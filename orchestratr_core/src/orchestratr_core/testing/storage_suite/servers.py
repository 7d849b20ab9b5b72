"""Storage conformance, servers: heartbeats, expiry and the server queries."""

from __future__ import annotations

import dataclasses
from datetime import datetime

import pytest

from orchestratr_core.job import JobEvent, JobQuery, JobStatus, ServerQuery, ServerStatus, new_id
from orchestratr_core.protocol import RunningJob, ServerHeartbeat
from orchestratr_core.storage import Storage
from orchestratr_core.testing.storage_suite._common import (
    HOLDER,
    LEASE,
    STEP,
    _create,
    _get,
    _heartbeat,
    _ids,
    _in_status,
    _must,
    _now,
    _same_time,
    _sec,
)

__all__ = ["HeartbeatTests", "ServerExpiryTests", "ServerQueryTests"]


class HeartbeatTests:
    """``apply_heartbeat``."""

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

    async def test_touch_servers_writes_each_server_row_as_a_heartbeat_would(
        self, storage: Storage
    ) -> None:
        """``touch_servers``: the rows of heartbeats that list no job, written
        together -- ``last_seen`` from each one's time (the latest of a server
        wins), a requested drain kept, a dead server alive again, its jobs left
        as they are; a heartbeat that lists jobs is refused."""
        now = _now()
        job = await _create(storage, "touched")
        await storage.transition(job.id, JobEvent.START, server_id="s1", fence=1, now=now)
        await storage.apply_heartbeat(_heartbeat("s1", [RunningJob(job.id, 1)], at=now), now)
        await storage.apply_heartbeat(_heartbeat("s3", at=now), now)
        await storage.apply_heartbeat(_heartbeat("s2", at=now + _sec(2)), now + _sec(2))
        assert await storage.set_server_status("s2", ServerStatus.DRAINING, now)
        dead = await storage.expire_servers(now + _sec(1), now + _sec(1))
        assert {s.id for s in dead} == {"s1", "s3"}
        await storage.transition(job.id, JobEvent.START, server_id="s1", fence=2, now=now)
        later, latest = now + _sec(5), now + _sec(6)

        def delta(server_id: str, at: datetime) -> ServerHeartbeat:
            return dataclasses.replace(
                _heartbeat(server_id, at=at, max_workers=7), seq=3, base=2, running=1
            )

        await storage.touch_servers(
            [
                (delta("s1", later), later),
                (delta("s2", later), later),
                (delta("s1", latest), latest),
            ]
        )
        rows = {sid: await storage.get_server(sid) for sid in ("s1", "s2", "s3")}
        s1, s2, s3 = rows["s1"], rows["s2"], rows["s3"]
        assert s1 is not None and s2 is not None and s3 is not None
        assert _same_time(s1.last_seen, latest) and _same_time(s2.last_seen, later)
        assert (s1.status, s1.max_workers) == (ServerStatus.ALIVE, 7)
        assert s2.status is ServerStatus.DRAINING
        assert s3.status is ServerStatus.DEAD and _same_time(s3.last_seen, now)
        record = await _get(storage, job.id)
        assert (record.status, record.server_id, record.fence) == (JobStatus.PROCESSING, "s1", 2)
        await storage.touch_servers([])
        listing = dataclasses.replace(delta("s3", later), jobs=(RunningJob(job.id, 2),))
        with pytest.raises(ValueError):
            await storage.touch_servers([(listing, later)])

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

    @pytest.mark.parametrize("shape", ["delta", "delta-gone", "complete"])
    async def test_read_and_apply_heartbeat_reads_the_jobs_as_they_were_then_applies_it(
        self, storage: Storage, shape: str
    ) -> None:
        """``read_and_apply_heartbeat``: the jobs of ``read`` as they were before
        the heartbeat (a moved one still on its old owner, a new one pending,
        unknown ids left out), and what :meth:`apply_heartbeat` returns -- the
        refused reports, the accepted ones applied, the releases as the
        heartbeat says."""
        now = _now()
        new = await _create(storage, at=now)
        moved = await _in_status(storage, JobStatus.PROCESSING, now, server="s2", fence=3)
        theirs = await _in_status(storage, JobStatus.PROCESSING, now, server="s2", fence=9)
        dropped = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=2)
        later = now + _sec(1)
        hb = _heartbeat(
            "s1",
            [RunningJob(new.id, 5), RunningJob(moved.id, 5), RunningJob(theirs.id, 5)],
            at=later,
        )
        if shape != "complete":  # a delta keeps the unlisted jobs, releases those gone
            gone = (dropped.id,) if shape == "delta-gone" else ()
            hb = dataclasses.replace(hb, seq=4, base=3, gone=gone)
        hb = dataclasses.replace(hb, started=(new.id, moved.id))
        before, refused = await storage.read_and_apply_heartbeat(
            hb, later, [new.id, moved.id, new.id, new_id()]
        )
        assert sorted(_ids(before)) == sorted([new.id, moved.id])
        assert {job.id: job for job in before} == {new.id: new, moved.id: moved}
        assert refused == [theirs]
        for job in (new, moved):
            after = await _get(storage, job.id)
            assert (after.status, after.server_id, after.fence) == (JobStatus.PROCESSING, "s1", 5)
        assert await storage.get_job(theirs.id) == theirs
        if shape == "delta":
            assert await storage.get_job(dropped.id) == dropped
        else:
            released = await _get(storage, dropped.id)
            assert (released.status, released.server_id) == (JobStatus.PENDING, None)
        server = await storage.get_server("s1")
        assert server is not None and _same_time(server.last_seen, later)
        # Nothing to read: the heartbeat alone, as apply_heartbeat.
        again = now + _sec(2)
        assert await storage.read_and_apply_heartbeat(
            dataclasses.replace(hb, sent_at=again.timestamp(), started=()), again, []
        ) == ([], [theirs])

    async def test_a_heartbeat_of_what_changed_releases_only_the_jobs_it_says_are_gone(
        self, storage: Storage
    ) -> None:
        """``base`` set: the unlisted jobs stay as they are (no write), the listed
        ones start, and only the ids in ``gone`` still owned here are released."""
        now = _now()
        idle = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=1)
        gone = await _in_status(storage, JobStatus.PROCESSING, now, server="s1", fence=2)
        cancelling = await _in_status(storage, JobStatus.DELETING, now, server="s1", fence=3)
        moved = await _in_status(storage, JobStatus.PROCESSING, now, server="s2", fence=4)
        new = await _create(storage, at=now)
        later = now + STEP + _sec(5)  # even past the refresh step, an unlisted job is kept
        hb = dataclasses.replace(
            _heartbeat("s1", [RunningJob(new.id, 6)], at=later),
            seq=9,
            base=8,
            gone=(gone.id, cancelling.id, moved.id, new.id, new_id()),
        )
        assert await storage.apply_heartbeat(hb, later) == []
        assert await storage.get_job(idle.id) == idle
        after_gone = await _get(storage, gone.id)
        assert (after_gone.status, after_gone.server_id) == (JobStatus.PENDING, None)
        after_cancelling = await _get(storage, cancelling.id)
        assert (after_cancelling.status, after_cancelling.server_id) == (JobStatus.DELETING, None)
        assert await storage.get_job(moved.id) == moved  # another server's: untouched
        started = await _get(storage, new.id)  # listed and gone at once: listed wins
        assert (started.status, started.server_id, started.fence) == (
            JobStatus.PROCESSING,
            "s1",
            6,
        )
        server = await storage.get_server("s1")
        assert server is not None and sorted(_ids(server.running)) == sorted([idle.id, new.id])

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


class ServerExpiryTests:
    """``expire_servers`` and ``server_left``."""

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


class ServerQueryTests:
    """``list_servers``, ``get_server``."""

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
