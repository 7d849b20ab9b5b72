"""Heartbeats that carry what changed: the server's series, the manager's copy of
each server's set, the exchange between them (acknowledgement, complete listing on
request), and a mixed fleet (an older server's heartbeats)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from datetime import timedelta
from typing import Any

import pytest

from orchestratr_core import protocol as p
from orchestratr_core import server_views as server_views_module
from orchestratr_core.errors import MalformedMessage
from orchestratr_core.job import JobStatus, ServerStatus, utcnow
from orchestratr_core.server import beats as server_beats
from orchestratr_core.server.beats import ACK_PATIENCE, MAX_LAG, HeartbeatSeries
from orchestratr_core.server_views import ServerViews, Verdict
from tests.support.cluster import FAST_MANAGER, Cluster, eventually


def _hb(
    series_out: tuple[int, int, tuple[p.RunningJob, ...], tuple[str, ...], int, int],
    server_id: str = "s1",
) -> p.ServerHeartbeat:
    seq, base, jobs, gone, digest, running = series_out
    return p.ServerHeartbeat(
        server_id=server_id,
        name="n",
        max_workers=10,
        started_at=1.0,
        sent_at=2.0,
        jobs=jobs,
        seq=seq,
        base=base,
        gone=gone,
        digest=digest,
        running=running,
    )


def _reports(*jobs: p.RunningJob, watched: bool = False) -> list[tuple[p.RunningJob, bool]]:
    return [(job, watched) for job in jobs]


A = p.RunningJob("a", 1, 10.0, 0)
B = p.RunningJob("b", 2, None, 0)
C = p.RunningJob("c", 3, None, 0)


def test_a_series_lists_everything_until_acknowledged_then_only_what_changed() -> None:
    series, views = HeartbeatSeries(), ServerViews(stale_after=60.0)
    first = _hb(series.next(_reports(A, B)))
    assert (first.seq, first.base, first.jobs, first.running) == (1, 0, (A, B), 2)
    assert views.receive(first) is Verdict.ACK
    assert not series.acknowledged(p.HeartbeatAck(seq=first.seq))
    idle = _hb(series.next(_reports(A, B)))
    assert (idle.base, idle.jobs, idle.gone, idle.running) == (1, (), (), 2)
    assert idle.digest == first.digest
    assert views.receive(idle) is Verdict.NOTHING  # nothing new: no answer
    restarted = dataclasses.replace(B, restarts=1)
    change = _hb(series.next(_reports(restarted, C)))
    assert (change.base, set(change.jobs), change.gone, change.running) == (
        1,
        {restarted, C},
        ("a",),
        2,
    )
    assert views.receive(change) is Verdict.ACK
    series.acknowledged(p.HeartbeatAck(seq=change.seq))
    after = _hb(series.next(_reports(restarted, C)))
    assert (after.base, after.jobs, after.gone) == (change.seq, (), ())
    assert views.receive(after) is Verdict.NOTHING


def test_a_job_s_own_beat_is_listed_only_for_a_watchdog_and_only_after_the_step() -> None:
    series = HeartbeatSeries()
    series.next(_reports(A))
    series.acknowledged(p.HeartbeatAck(seq=1))
    fresher = dataclasses.replace(A, last_heartbeat=10.0 + server_beats.BEAT_REPORT_STEP / 2)
    assert _hb(series.next(_reports(fresher, watched=True))).jobs == ()
    assert _hb(series.next(_reports(fresher, watched=False))).jobs == ()
    stale = dataclasses.replace(A, last_heartbeat=10.0 + server_beats.BEAT_REPORT_STEP)
    assert _hb(series.next(_reports(stale, watched=False))).jobs == ()  # no watchdog
    assert _hb(series.next(_reports(stale, watched=True))).jobs == (stale,)


def test_a_manager_without_the_set_or_with_another_digest_asks_for_a_complete_listing() -> None:
    series = HeartbeatSeries()
    first = _hb(series.next(_reports(A, B)))
    ServerViews(stale_after=60.0).receive(first)
    series.acknowledged(p.HeartbeatAck(seq=first.seq))
    delta = _hb(series.next(_reports(A, B, C)))
    assert delta.base == first.seq
    # A restarted manager has no copy: it asks, and the server lists everything at once.
    fresh = ServerViews(stale_after=60.0)
    assert fresh.receive(delta) is Verdict.FULL
    assert series.acknowledged(p.HeartbeatAck(seq=delta.seq, full=True))
    complete = _hb(series.next(_reports(A, B, C)))
    assert (complete.base, complete.jobs) == (0, (A, B, C))
    assert fresh.receive(complete) is Verdict.ACK
    # A copy that disagrees with the server's digest (an event lost on the way).
    wrong = ServerViews(stale_after=60.0)
    wrong.receive(first)
    assert wrong.receive(dataclasses.replace(delta, digest=delta.digest ^ 1)) is Verdict.FULL
    assert wrong.receive(delta) is Verdict.FULL  # the copy was dropped: still asks
    # A gone job the copy never had.
    other = ServerViews(stale_after=60.0)
    other.receive(first)
    assert other.receive(dataclasses.replace(delta, gone=("zz",))) is Verdict.FULL


def test_a_copy_not_refreshed_for_long_is_not_trusted() -> None:
    """The server may have been declared dead meanwhile and its jobs released."""
    series, views = HeartbeatSeries(), ServerViews(stale_after=0.0)
    first = _hb(series.next(_reports(A)))
    views.receive(first)
    series.acknowledged(p.HeartbeatAck(seq=first.seq))
    assert views.receive(_hb(series.next(_reports(A)))) is Verdict.FULL
    views.forget("s1")
    assert len(views) == 0


def test_a_delta_on_an_earlier_acknowledgement_is_applied_without_asking() -> None:
    """Built before the newer acknowledgement reached the server."""
    series, views = HeartbeatSeries(), ServerViews(stale_after=60.0)
    first = _hb(series.next(_reports(A)))
    views.receive(first)
    series.acknowledged(p.HeartbeatAck(seq=first.seq))
    second = _hb(series.next(_reports(A, B)))
    third = _hb(series.next(_reports(A, B, C)))  # built before the ack of `second`
    assert views.receive(second) is Verdict.ACK
    assert views.receive(third) is Verdict.NOTHING
    series.acknowledged(p.HeartbeatAck(seq=second.seq))
    fourth = _hb(series.next(_reports(A, B, C)))
    assert (fourth.base, fourth.jobs) == (second.seq, (C,))
    assert views.receive(fourth) is Verdict.ACK


def test_a_server_whose_changes_go_unacknowledged_lists_everything_again() -> None:
    """An older manager (or none) answers nothing: the server never relies on it."""
    series = HeartbeatSeries()
    series.next(_reports(A))
    series.acknowledged(p.HeartbeatAck(seq=1))
    bases = [_hb(series.next(_reports(A, B))).base for _ in range(ACK_PATIENCE + 1)]
    assert bases == [1] * ACK_PATIENCE + [0]


def test_the_new_fields_round_trip_and_stay_out_of_an_unnumbered_heartbeat() -> None:
    delta = p.ServerHeartbeat(
        server_id="s1",
        name="n",
        max_workers=2,
        started_at=1.0,
        sent_at=2.0,
        jobs=(A,),
        seq=7,
        base=5,
        gone=("b",),
        digest=(1 << 63) - 1,
        running=4,
    )
    assert p.decode(p.encode(delta)) == delta
    old_shape = dataclasses.replace(delta, seq=0, base=0, gone=(), digest=0, running=0)
    body = json.loads(p.encode(old_shape))
    assert not {"seq", "base", "gone", "digest", "running"} & set(body)
    ack = p.HeartbeatAck(seq=7, full=True)
    assert p.decode(p.encode(ack)) == ack


@pytest.mark.parametrize(
    ("field", "value"),
    [("seq", -1), ("digest", 1 << 63), ("running", True), ("gone", "a"), ("gone", [1])],
)
def test_malformed_new_fields_make_the_heartbeat_malformed(field: str, value: Any) -> None:
    body = json.loads(p.encode(_hb(HeartbeatSeries().next(_reports(A)))))
    body[field] = value
    with pytest.raises(MalformedMessage, match=field):
        p.decode(json.dumps(body))


def _older_server_heartbeat(server_id: str, jobs: list[tuple[str, int]]) -> bytes:
    """A heartbeat exactly as a server of the previous version writes it: no
    ``seq``, ``digest``, ``running``, ``base`` or ``gone`` (and jobs as objects,
    as versions before the array form wrote them)."""
    return json.dumps(
        {
            "v": 1,
            "type": "heartbeat",
            "server_id": server_id,
            "name": "old",
            "max_workers": 10,
            "started_at": 1.0,
            "sent_at": 2.0,
            "host": "h",
            "pid": 1,
            "draining": False,
            "jobs": [
                {"job_id": job_id, "fence": fence, "last_heartbeat": None, "restarts": 0}
                for job_id, fence in jobs
            ],
        }
    ).encode()


async def test_an_older_server_s_heartbeats_are_complete_listings_and_get_no_answer(
    cluster: Cluster,
) -> None:
    """Mixed fleet during an upgrade: the manager reads an older server's heartbeat
    as the complete set (what it does not list is released) and sends it nothing
    it could not read."""
    manager = await cluster.start_manager()
    kept, dropped = await cluster.create(2)
    sent: list[tuple[p.Command, str | None]] = []
    send = manager.transport.send_command

    async def spy(command: p.Command, server_id: str | None = None) -> None:
        sent.append((command, server_id))
        await send(command, server_id)

    manager._transport.send_command = spy  # type: ignore[method-assign]
    for heartbeat in (
        _older_server_heartbeat("old-1", [(kept, 1 << 32), (dropped, 1 << 32)]),
        _older_server_heartbeat("old-1", [(kept, 1 << 32)]),
    ):
        event = p.decode_as(heartbeat, p.ServerHeartbeat)
        assert (event.seq, event.base) == (0, 0)
        await manager._on_event(event)
    assert (await cluster.job(kept)).status is JobStatus.PROCESSING
    assert (await cluster.job(dropped)).status is JobStatus.PENDING  # unlisted: released
    assert not [c for c, target in sent if isinstance(c, p.HeartbeatAck)]


def _heartbeats_applied(cluster: Cluster) -> list[p.ServerHeartbeat]:
    """A list that the running manager's storage fills with each heartbeat it applies."""
    seen: list[p.ServerHeartbeat] = []
    manager = cluster.manager
    assert manager is not None
    apply = manager.storage.apply_heartbeat

    async def spy(hb: p.ServerHeartbeat, now: Any) -> Any:
        seen.append(hb)
        return await apply(hb, now)

    manager.storage.apply_heartbeat = spy  # type: ignore[method-assign]
    return seen


async def test_idle_jobs_are_left_out_of_heartbeats_and_cost_the_storage_no_write(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    server = await cluster.add_server("a", 20)
    ids = await cluster.create(20)
    await cluster.wait_running(ids)
    await eventually(lambda: server._beats.base > 0, what="a heartbeat acknowledged")
    await eventually(
        lambda: (
            all(r.stop_reason is None for r in server._runs.values()) and len(server._runs) == 20
        ),
        what="20 runs",
    )
    await asyncio.sleep(0.5)  # the starts are applied
    before = {job_id: await cluster.storage.get_job(job_id) for job_id in ids}
    seen = _heartbeats_applied(cluster)
    await eventually(lambda: len(seen) >= 4, what="four heartbeats")
    assert all(hb.base and not hb.jobs and not hb.gone and hb.running == 20 for hb in seen)
    for job_id in ids:
        assert await cluster.storage.get_job(job_id) == before[job_id]  # no field rewritten


async def test_a_restarted_manager_gets_a_complete_listing_and_converges(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    server = await cluster.add_server("a", 10)
    ids = await cluster.create(6)
    await cluster.wait_running(ids)
    await eventually(lambda: server._beats.base > 0, what="a heartbeat acknowledged")
    assert cluster.manager is not None
    before = server._beats.base
    await cluster.manager.stop()
    manager = await cluster.start_manager(dataclasses.replace(FAST_MANAGER))
    # Its first delta finds no copy: it asks, gets everything, acknowledges that.
    await eventually(lambda: server._beats.base > before, what="a new acknowledgement")
    for job_id in ids:
        record = await cluster.job(job_id)
        assert (record.status, record.server_id) == (JobStatus.PROCESSING, server.id)
    assert len(manager._views) == 1


async def test_a_new_manager_after_a_long_outage_declares_no_live_server_dead(
    cluster: Cluster,
) -> None:
    """The manager was down for longer than the server timeout: the servers' rows
    are as old as the outage, and their heartbeats wait in the broker. The new
    leader must not declare them dead (and release their jobs) before it has had
    one server timeout to apply what they sent."""
    await cluster.start_manager()
    servers = [await cluster.add_server(name, 5) for name in ("a", "b")]
    ids = await cluster.create(6)
    await cluster.wait_running(ids)
    await asyncio.sleep(0.5)  # every start applied
    before = {job_id: await cluster.job(job_id) for job_id in ids}
    assert all(record.status is JobStatus.PROCESSING for record in before.values())
    assert cluster.manager is not None
    await cluster.manager.stop()
    await asyncio.sleep(2 * FAST_MANAGER.server_timeout)
    manager = await cluster.start_manager()
    watch_until = time.monotonic() + 3 * FAST_MANAGER.server_timeout
    while time.monotonic() < watch_until:
        for server in servers:
            record = await cluster.storage.get_server(server.id)
            assert record is not None and record.status is ServerStatus.ALIVE, record
        for job_id in ids:
            now = await cluster.job(job_id)
            was = before[job_id]
            assert (now.status, now.server_id, now.fence) == (was.status, was.server_id, was.fence)
        await asyncio.sleep(0.02)
    assert manager.is_leader
    assert all(len(cluster.ledger.running(job_id)) == 1 for job_id in ids)


async def test_a_leader_still_declares_a_silent_server_dead(cluster: Cluster) -> None:
    """The new leader's wait is one server timeout, not for ever."""
    await cluster.start_manager()
    keep = await cluster.add_server("a", 5)
    gone = await cluster.add_server("b", 5)
    ids = await cluster.create(6)
    await cluster.wait_running(ids)
    await gone.kill()
    await eventually(
        lambda: _status(cluster, gone.id, ServerStatus.DEAD),
        timeout=4 * FAST_MANAGER.server_timeout,
        what="the killed server declared dead",
    )
    record = await cluster.storage.get_server(keep.id)
    assert record is not None and record.status is ServerStatus.ALIVE


async def test_a_server_declared_dead_elsewhere_while_alive_here_claims_its_jobs_back(
    cluster: Cluster,
) -> None:
    """Another manager (the leader, not consuming the events) declared a live
    server dead: its jobs were released in the storage, while this manager, the
    events consumer, holds the server's set and its deltas match it. The
    leader's :class:`~orchestratr_core.protocol.ServerDeclaredDead` makes this
    manager drop its copy: the server's next heartbeat is answered with a
    request for a complete listing, which claims its jobs back (a delta would
    never list them: they stayed ``pending`` while it ran them)."""
    await cluster.start_manager()
    server = await cluster.add_server("a", 10)
    ids = await cluster.create(6)
    await cluster.wait_running(ids)
    await eventually(lambda: server._beats.base > 0, what="a heartbeat acknowledged")
    await asyncio.sleep(0.5)  # every start applied; deltas since
    now = utcnow()
    expired = await cluster.storage.expire_servers(now + timedelta(seconds=60), now)
    assert [s.id for s in expired] == [server.id]
    assert {(await cluster.job(j)).status for j in ids} == {JobStatus.PENDING}
    leader = cluster.transport()
    await leader.connect()
    try:
        await leader.publish_event(p.ServerDeclaredDead(server_id=server.id, at=now.timestamp()))
    finally:
        await leader.close()

    async def claimed() -> bool:
        records = [await cluster.job(j) for j in ids]
        return all(
            (r.status, r.server_id) == (JobStatus.PROCESSING, server.id) for r in records
        ) and await _status(cluster, server.id, ServerStatus.ALIVE)

    await eventually(claimed, timeout=10 * server.options.heartbeat_interval, what="jobs back")
    assert all(len(cluster.ledger.running(j)) == 1 for j in ids)  # never a second copy


async def _status(cluster: Cluster, server_id: str, status: ServerStatus) -> bool:
    record = await cluster.storage.get_server(server_id)
    return record is not None and record.status is status


async def test_a_healthy_running_job_shows_its_server_s_heartbeat_as_its_liveness(
    cluster: Cluster,
) -> None:
    """Idle jobs are not in every heartbeat, so their stored beat ages; what an
    operator sees (monitor, API, CLI, dashboard) is the server's last heartbeat."""
    from orchestratr_core.web.models import JobOut, job_out

    await cluster.start_manager()
    server = await cluster.add_server("a", 4)
    (job_id,) = await cluster.create(1)
    await cluster.wait_status(job_id, JobStatus.PROCESSING)
    await asyncio.sleep(0.6)  # a few server heartbeats later
    record = await cluster.job(job_id)
    live = await cluster.monitor.server(server.id)
    assert record.server_seen is not None and record.liveness == record.server_seen
    assert record.last_heartbeat is not None and record.liveness > record.last_heartbeat
    assert abs((record.server_seen - live.last_seen).total_seconds()) < 1.0
    assert record.to_dict()["liveness"] == record.server_seen.isoformat()
    assert job_out(record).liveness == record.server_seen
    assert "liveness" in JobOut.model_json_schema()["properties"]
    (running,) = live.running
    assert running.liveness == live.last_seen
    page = await cluster.monitor.jobs()
    assert page.items[0].server_seen is not None
    # Once its server is gone, a job shows its own stored beat again.
    await server.kill()
    pending = await cluster.wait_status(job_id, JobStatus.PENDING)
    assert pending.server_seen is None and pending.liveness == pending.last_heartbeat


def test_a_heartbeat_with_refused_copies_is_not_acknowledged_so_they_are_listed_again() -> None:
    """A copy the storage refused is raised again by every heartbeat until it is
    gone: the manager does not take the set as known while it holds one."""
    series, views = HeartbeatSeries(), ServerViews(stale_after=60.0)
    first = _hb(series.next(_reports(A)))
    assert views.receive(first, refused=True) is Verdict.NOTHING
    assert len(views) == 0
    again = _hb(series.next(_reports(A)))
    assert (again.base, again.jobs) == (0, (A,))  # still a complete listing
    assert views.receive(again) is Verdict.ACK
    series.acknowledged(p.HeartbeatAck(seq=again.seq))
    delta = _hb(series.next(_reports(A, B)))
    assert views.receive(delta, refused=True) is Verdict.NOTHING
    assert _hb(series.next(_reports(A, B))).jobs == (B,)  # listed again


def test_a_new_checkpoint_is_a_change_listed_until_a_heartbeat_carrying_it_is_acknowledged() -> (
    None
):
    """An idle job is in no delta; the heartbeat after it records a checkpoint lists
    it with the checkpoint, and so do the next ones until one is acknowledged (a
    lost heartbeat loses no checkpoint). The set's digest does not change."""
    series, views = HeartbeatSeries(), ServerViews(stale_after=60.0)
    first = _hb(series.next(_reports(A, B)))
    assert views.receive(first) is Verdict.ACK
    series.acknowledged(p.HeartbeatAck(seq=first.seq))
    saved = dataclasses.replace(B, checkpoint='{"n": 1}')
    lost = _hb(series.next(_reports(A, saved)))  # never reaches the manager
    assert (lost.base, lost.jobs, lost.digest) == (first.seq, (saved,), first.digest)
    again = _hb(series.next(_reports(A, B)))  # the job's report is plain again
    assert [(j.job_id, j.checkpoint) for j in again.jobs] == [("b", '{"n": 1}')]
    assert views.receive(again) is Verdict.ACK  # a change: acknowledged
    series.acknowledged(p.HeartbeatAck(seq=again.seq))
    assert _hb(series.next(_reports(A, B))).jobs == ()  # idle again
    # A newer checkpoint replaces an unacknowledged one; a moved job drops it.
    newer = dataclasses.replace(B, checkpoint='{"n": 3}')
    series.next(_reports(A, dataclasses.replace(B, checkpoint='{"n": 2}')))
    assert _hb(series.next(_reports(A, newer))).jobs == (newer,)
    moved = dataclasses.replace(B, fence=B.fence + 1)
    assert _hb(series.next(_reports(A, moved))).jobs == (moved,)


def test_a_complete_listing_carries_the_unacknowledged_checkpoint_and_gives_up_after_patience() -> (
    None
):
    """Toward a manager that never answers (an older version), a checkpoint goes in
    at most ACK_PATIENCE + 1 complete listings, then the job is listed plain."""
    series = HeartbeatSeries()
    saved = dataclasses.replace(A, checkpoint="c1")
    carried = [_hb(series.next(_reports(saved if i == 0 else A))).jobs[0] for i in range(6)]
    assert [job.checkpoint for job in carried] == ["c1"] * (ACK_PATIENCE + 1) + [None] * (
        5 - ACK_PATIENCE
    )
    # A full-listing request also says the heartbeat was applied: the checkpoint goes no more.
    series = HeartbeatSeries()
    first = _hb(series.next(_reports(saved)))
    assert series.acknowledged(p.HeartbeatAck(seq=first.seq, full=True))
    assert _hb(series.next(_reports(A))).jobs == (A,)


async def test_a_checkpoint_of_an_otherwise_idle_job_reaches_the_storage_through_a_delta(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    server = await cluster.add_server("a", 4)
    (job_id, other) = await cluster.create(2)
    await cluster.wait_running([job_id, other])
    await eventually(lambda: server._beats.base > 0, what="a heartbeat acknowledged")
    await asyncio.sleep(0.5)  # the starts are applied and acknowledged: deltas are empty
    seen = _heartbeats_applied(cluster)
    server._runs[job_id].beat('{"step": 7}')  # what heartbeat(checkpoint=...) does

    async def stored() -> bool:
        return (await cluster.job(job_id)).checkpoint == '{"step": 7}'

    await eventually(stored, what="the checkpoint stored")
    carrying = [hb for hb in seen if any(j.checkpoint for j in hb.jobs)]
    assert carrying and all(hb.base for hb in carrying)  # deltas, not complete listings
    assert all({j.job_id for j in hb.jobs} == {job_id} for hb in carrying), [
        hb.jobs for hb in carrying
    ]
    record = await cluster.job(job_id)
    assert record.checkpoint_fence == record.fence
    await eventually(
        lambda: job_id not in server._beats._checkpoints, what="the checkpoint acknowledged"
    )


def test_a_delta_that_names_hundreds_of_jobs_gone_is_decoded_and_applied() -> None:
    """A server that stopped many jobs at once (a drain, a mass cancel, a rebalance)
    names them all in ``gone``: that list is not capped like kinds or labels (a
    refused heartbeat is dead-lettered, and its server's liveness with it)."""
    series, views = HeartbeatSeries(), ServerViews(stale_after=60.0)
    many = [p.RunningJob(f"job-{i:04d}", 1, None, 0) for i in range(300)]
    first = _hb(series.next(_reports(*many)))
    assert views.receive(p.decode_as(p.encode(first), p.ServerHeartbeat)) is Verdict.ACK
    series.acknowledged(p.HeartbeatAck(seq=first.seq))
    after = _hb(series.next(_reports(*many[:10])))
    assert len(after.gone) == 290
    decoded = p.decode_as(p.encode(after), p.ServerHeartbeat)
    assert decoded.gone == after.gone
    assert views.receive(decoded) is Verdict.ACK
    with pytest.raises(MalformedMessage):
        body = json.loads(p.encode(after))
        body["kinds"] = [f"k{i}" for i in range(65)]
        p.decode_as(json.dumps(body).encode(), p.ServerHeartbeat)


async def test_unchanged_heartbeats_are_written_together_and_before_the_next_event(
    cluster: Cluster,
) -> None:
    """An idle server's heartbeats change nothing but its row: the manager writes
    them in batches (``touch_servers``), its ``last_seen`` still follows them, and
    a later event of the server (it leaves) is applied after them, not before."""
    manager = await cluster.start_manager(dataclasses.replace(FAST_MANAGER, seen_batch=0.3))
    batches: list[list[str]] = []
    touch = manager.storage.touch_servers

    async def spy(heartbeats: Any) -> None:
        batches.append([hb.server_id for hb, _ in heartbeats])
        await touch(heartbeats)

    manager.storage.touch_servers = spy  # type: ignore[method-assign]
    servers = [await cluster.add_server(name, 5) for name in ("a", "b")]
    ids = await cluster.create(4)
    await cluster.wait_running(ids)
    await eventually(lambda: len(batches) >= 3, what="three batches of idle heartbeats")
    assert any(len(batch) == 2 for batch in batches), batches  # both servers in one
    before = await cluster.storage.get_server(servers[0].id)
    assert before is not None
    await asyncio.sleep(1.0)
    after = await cluster.storage.get_server(servers[0].id)
    assert after is not None and after.last_seen > before.last_seen
    noted = len(batches)
    await servers[0].stop()
    record = await eventually(
        lambda: _status(cluster, servers[0].id, ServerStatus.LEFT), what="left"
    )
    assert record
    await asyncio.sleep(0.5)  # a batch written after the leave would bring it back
    assert await _status(cluster, servers[0].id, ServerStatus.LEFT)
    assert len(batches) > noted


def test_a_manager_far_behind_its_events_settles_on_deltas_once_the_set_is_stable() -> None:
    """The manager applies each heartbeat 20 heartbeats after it was sent (it is
    behind its events queue; its acknowledgements reach the server 20 heartbeats
    late -- the server once kept only 16 sets, and now rebuilds them). Once the server's set no
    longer changes, an acknowledgement of a set equal to the one last sent
    counts (by digest), the manager applies deltas on it to its copy (same
    digest), and the heartbeats are deltas again -- before, every heartbeat
    was a complete listing for as long as the manager stayed that far behind."""
    lag = 20
    series, views = HeartbeatSeries(), ServerViews(stale_after=60.0)
    in_flight: list[p.ServerHeartbeat] = []
    jobs = [A]
    sent: list[p.ServerHeartbeat] = []
    for step in range(200):
        if step < 30:
            jobs.append(p.RunningJob(f"j{step}", 1, None, 0))  # a fill, then stable
        hb = _hb(series.next(_reports(*jobs)))
        sent.append(hb)
        in_flight.append(hb)
        if len(in_flight) > lag:
            applied = in_flight.pop(0)
            verdict = views.receive(applied)
            if verdict is not Verdict.NOTHING:
                series.acknowledged(p.HeartbeatAck(seq=applied.seq, full=verdict is Verdict.FULL))
    tail = sent[-100:]
    assert all(hb.base for hb in tail), [hb.base for hb in tail]
    assert all(not hb.jobs for hb in tail)


class _Clock:
    """Stands in for the ``time`` module of :mod:`orchestratr_core.server_views`:
    one clock the test moves, for the wall and the monotonic time alike."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


def _behind_through_a_fill(
    monkeypatch: pytest.MonkeyPatch,
    lag: int,
    steps: int,
    fill: int,
    *,
    per_step: int = 1,
    stop_every: int = 5,
    chain: bool = False,
) -> tuple[list[p.ServerHeartbeat], list[Verdict], ServerViews, set[str]]:
    """A server heartbeats every 2 s; ``per_step`` jobs start at every heartbeat
    of the first ``fill`` and at every ``stop_every``-th one a job stops; the
    manager applies each heartbeat ``lag`` heartbeats after it was sent (it is
    behind its events queue), its answers say ``chain`` as given, and each
    reaches the server before the next heartbeat. Returns what was sent, the
    manager's verdicts, its copy, and the final set."""
    clock = _Clock()
    monkeypatch.setattr(server_views_module, "time", clock)
    series, views = HeartbeatSeries(), ServerViews(stale_after=36_000.0)
    jobs: dict[str, p.RunningJob] = {}
    sent: list[p.ServerHeartbeat] = []
    verdicts: list[Verdict] = []
    in_flight: list[p.ServerHeartbeat] = []
    for step in range(steps):
        clock.now += 2.0
        if step < fill:
            for n in range(per_step):
                jobs[f"j{step}-{n}"] = p.RunningJob(f"j{step}-{n}", 1, None, 0)
            if step % stop_every == stop_every - 1:
                del jobs[f"j{step - 2}-0"]
        hb = _chained(series, *jobs.values(), sent_at=clock.now)
        sent.append(hb)
        in_flight.append(hb)
        if len(in_flight) > lag:
            applied = in_flight.pop(0)
            verdict = views.receive(applied)
            verdicts.append(verdict)
            _answer(series, applied, verdict, chain)
    return sent, verdicts, views, set(jobs)


def test_a_manager_behind_through_a_long_fill_gets_deltas_never_complete_listings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The feedback that kept a manager of a million jobs from catching up: it
    applied each heartbeat 25 heartbeats (50 s) late while every server filled,
    each server's changes stayed unacknowledged for more than ACK_PATIENCE
    heartbeats, and each heartbeat became a complete listing -- hundreds of jobs
    for the manager to apply instead of one or two. The server now waits for an
    answer as long as the manager's last answer took (plus the patience), an
    acknowledgement of a heartbeat sent 25 heartbeats back still moves its base
    (the set is rebuilt from the differences), and the manager applies the
    deltas built before its acknowledgement arrived (judged by when they were
    sent), so neither side falls back."""
    lag = 25
    sent, verdicts, views, final = _behind_through_a_fill(monkeypatch, lag, steps=400, fill=300)
    first_acked = next(i for i, hb in enumerate(sent) if hb.base)
    assert first_acked <= lag + 2
    complete = [hb.seq for hb in sent[first_acked:] if not hb.base]
    assert complete == []
    assert Verdict.FULL not in verdicts
    # The deltas stay small: the changes of about two lags, not the set.
    assert max(len(hb.jobs) for hb in sent[first_acked:]) <= 2 * lag + 2
    assert max(hb.running for hb in sent) > 200
    assert views.running("s1") == frozenset(final)
    assert all(not hb.jobs and not hb.gone for hb in sent[-(lag + 10) :])


def test_a_lost_acknowledgement_is_still_found_when_the_manager_is_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A delta on an older acknowledged heartbeat, sent well after the newer
    acknowledgement went out, means that acknowledgement never arrived: the
    manager asks for a complete listing (by the server's clock, however late
    the manager applies it)."""
    clock = _Clock()
    monkeypatch.setattr(server_views_module, "time", clock)
    series, views = HeartbeatSeries(), ServerViews(stale_after=3600.0)

    def beat(*jobs: p.RunningJob, after: float = 2.0) -> p.ServerHeartbeat:
        clock.now += after
        return dataclasses.replace(_hb(series.next(_reports(*jobs))), sent_at=clock.now)

    first = beat(A)
    assert views.receive(first) is Verdict.ACK
    series.acknowledged(p.HeartbeatAck(seq=first.seq))
    second = beat(A, B)
    assert views.receive(second) is Verdict.ACK  # this acknowledgement is lost
    soon = beat(A, B, C)
    late = beat(A, B, C, after=4.0)
    assert (soon.base, late.base) == (first.seq, first.seq)
    clock.now += 60.0  # the manager applies them a minute later
    assert views.receive(soon) is Verdict.NOTHING  # sent 2 s after the acknowledgement
    assert views.receive(late) is Verdict.FULL  # sent 6 s after it


def test_the_patience_grows_with_the_manager_s_measured_lag_and_no_further() -> None:
    """A manager that answered 10 heartbeats late is given 3 + 2 x 10 heartbeats
    before the server lists everything again; a lag beyond MAX_LAG counts as
    MAX_LAG."""
    for lag, patience in ((10, ACK_PATIENCE + 20), (5_000, ACK_PATIENCE + 2 * MAX_LAG)):
        series = HeartbeatSeries()
        series.next(_reports(A))
        for _ in range(lag):
            series.next(_reports(A))
        assert not series.acknowledged(p.HeartbeatAck(seq=1))
        assert (series.base, series.lag) == (1, min(lag, MAX_LAG))
        bases = [_hb(series.next(_reports(A, B))).base for _ in range(patience + 1)]
        assert bases == [1] * patience + [0]


def test_an_acknowledgement_of_a_heartbeat_long_past_rebuilds_its_set() -> None:
    """The server keeps the difference of each heartbeat's set from the one
    before, not a copy of each set: an acknowledgement of heartbeat 3 of 60 --
    whose set the server no longer has as such, and which differs from the set
    sent last -- moves the base to it, and the next delta is relative to it."""
    series = HeartbeatSeries()
    jobs = [p.RunningJob(f"j{i}", 1, None, 0) for i in range(60)]
    for count in range(1, 61):
        series.next(_reports(*jobs[:count]))
    series.acknowledged(p.HeartbeatAck(seq=3))
    assert series.base == 3
    delta = _hb(series.next(_reports(*jobs[1:])))
    assert (set(delta.jobs), delta.gone) == (set(jobs[3:]), ("j0",))
    assert delta.running == 59


def test_a_delta_re_listing_jobs_already_applied_as_listed_applies_only_the_others() -> None:
    """A manager behind its events queue gets deltas on old acknowledgements,
    each listing again every job started since: the jobs it already applied
    with the same report are left out of the storage write; a changed report,
    a checkpoint, a start the heartbeat replaces, a complete listing and a copy
    that is not trusted are applied in full."""
    series, views = HeartbeatSeries(), ServerViews(stale_after=60.0)
    first = _hb(series.next(_reports(A)))
    assert views.unapplied(first) is None  # a complete listing: all of it
    assert views.receive(first) is Verdict.ACK
    series.acknowledged(p.HeartbeatAck(seq=first.seq))
    second = _hb(series.next(_reports(A, B)))
    assert second.jobs == (B,)
    assert views.unapplied(second) == (B,)  # not applied yet
    assert views.receive(second) is Verdict.ACK  # its acknowledgement is still on the way
    third = _hb(series.next(_reports(A, B, C)))
    assert (third.base, third.jobs) == (first.seq, (B, C))
    assert views.unapplied(third) == (C,)  # B was applied as it is listed
    assert not views.known_delta(third)  # C was not: it is applied
    assert views.receive(third) is Verdict.NOTHING  # built before the newer ack
    again = dataclasses.replace(third, seq=third.seq + 1)
    assert views.known_delta(again)  # only a touch of the server row
    assert not views.known_delta(dataclasses.replace(again, started=("c",)))
    assert not views.known_delta(dataclasses.replace(again, gone=("a",)))
    restarted = dataclasses.replace(B, restarts=1)
    checkpointed = dataclasses.replace(A, checkpoint="c1")
    changed = dataclasses.replace(third, jobs=(checkpointed, restarted, C))
    assert views.unapplied(changed) == (checkpointed, restarted)  # C is applied by now
    assert views.unapplied(dataclasses.replace(third, started=("b",))) == (B,)
    assert views.unapplied(dataclasses.replace(third, base=0)) is None
    assert ServerViews(stale_after=60.0).unapplied(third) is None  # no copy
    stale = ServerViews(stale_after=0.0)
    stale.receive(first)
    assert stale.unapplied(dataclasses.replace(second, sent_at=3.0)) is None


async def test_a_delta_re_listing_applied_jobs_is_written_as_a_touch_of_its_server_row(
    cluster: Cluster,
) -> None:
    """The manager end of the test above: a delta on an earlier acknowledgement
    that lists only jobs already applied is noted like an idle heartbeat, and the
    batched server-row write takes it (it once refused it as a heartbeat that
    lists jobs, so every such delta was dead-lettered after three tries)."""
    manager = await cluster.start_manager(
        dataclasses.replace(FAST_MANAGER, server_timeout=60.0, seen_batch=10.0)
    )
    a, b, c = await cluster.create(3)
    first_fence = 1 << 32
    jobs = {name: p.RunningJob(name, first_fence, None, 0) for name in (a, b, c)}
    series = HeartbeatSeries()

    def beat(*names: str) -> p.ServerHeartbeat:
        hb = _hb(series.next(_reports(*(jobs[n] for n in names))), server_id="behind")
        return dataclasses.replace(hb, sent_at=time.time())

    first = beat(a)
    await manager._on_event(first)
    series.acknowledged(p.HeartbeatAck(seq=first.seq))
    await manager._on_event(beat(a, b))  # its acknowledgement is still on the way
    third = beat(a, b, c)
    assert third.base == first.seq and len(third.jobs) == 2
    await manager._on_event(third)
    before = await cluster.storage.get_server("behind")
    assert before is not None
    again = dataclasses.replace(third, seq=third.seq + 1, sent_at=time.time() + 0.5)
    await manager._on_event(again)
    assert list(manager._touches) == ["behind"]  # noted, not applied
    await manager._flush_touches()
    assert not manager._touches
    record = await cluster.storage.get_server("behind")
    assert record is not None and record.status is ServerStatus.ALIVE
    assert record.last_seen > before.last_seen  # the touch was written
    assert {(await cluster.job(j)).status for j in (a, b, c)} == {JobStatus.PROCESSING}


async def test_a_heartbeat_is_not_held_up_by_its_acknowledgement_s_confirm(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While a fleet fills, every heartbeat carries starts and is answered: the
    manager applies the next event while the acknowledgements of the last ones
    wait for the transport's confirm (in the order the heartbeats came), and the
    next waits once too many are on their way. A send that fails is logged, and
    the next heartbeat is applied as usual."""
    from orchestratr_core import manager as manager_module

    monkeypatch.setattr(manager_module, "_ACKS_IN_FLIGHT", 2)
    manager = await cluster.start_manager()
    created = await cluster.create(3)
    confirm = asyncio.Event()
    sent: list[tuple[int, str | None]] = []
    send = manager.transport.send_command

    async def slow_confirm(command: p.Command, server_id: str | None = None) -> None:
        if isinstance(command, p.HeartbeatAck):
            sent.append((command.seq, server_id))
            await confirm.wait()
            if server_id == "broken":
                raise ConnectionResetError("the broker went away")
        await send(command, server_id)

    manager._transport.send_command = slow_confirm  # type: ignore[method-assign]
    servers = {name: HeartbeatSeries() for name in ("s-1", "broken", "s-3")}
    for (name, series), job_id in zip(servers.items(), created, strict=True):
        running = p.RunningJob(job_id, 1 << 32, None, 0)
        hb = dataclasses.replace(
            _hb(series.next(_reports(running)), server_id=name), sent_at=time.time()
        )
        handled = asyncio.ensure_future(manager._on_event(hb))
        if name == "s-3":  # two acknowledgements are waiting: this one waits for one
            await asyncio.sleep(0.2)
            assert not handled.done()
            assert [target for _, target in sent] == ["s-1", "broken"]
            confirm.set()
        await asyncio.wait_for(handled, 5)
        assert (await cluster.job(job_id)).status is JobStatus.PROCESSING
    await eventually(lambda: not manager._acks)
    assert [target for _, target in sent] == ["s-1", "broken", "s-3"]
    failed = [r.getMessage() for r in caplog.records if "could not send" in r.getMessage()]
    assert len(failed) == 1 and "broken" in failed[0] and "went away" in failed[0]


# -- chained deltas ------------------------------------------------------------------


def _chained(
    series: HeartbeatSeries,
    *jobs: p.RunningJob,
    sent_at: float = 2.0,
    published: bool = True,
) -> p.ServerHeartbeat:
    """The next heartbeat of ``series``, as the runtime builds it (with
    ``chained``), then reported published (or not) as the event pump does."""
    hb = dataclasses.replace(
        _hb(series.next(_reports(*jobs))), chained=series.chained, sent_at=sent_at
    )
    series.sent(hb.seq, published)
    return hb


def _answer(series: HeartbeatSeries, hb: p.ServerHeartbeat, verdict: Verdict, chain: bool) -> None:
    if verdict is not Verdict.NOTHING:
        series.acknowledged(p.HeartbeatAck(seq=hb.seq, full=verdict is Verdict.FULL, chain=chain))


def test_chained_deltas_list_one_interval_of_changes_however_far_behind_the_manager_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The feedback that kept a manager of a million jobs behind for good: it
    applied heartbeats minutes late while a fleet filled, so each delta on its
    last acknowledgement listed every job started since (here, up to a thousand),
    and past the server's patience every heartbeat became a complete listing.
    Chained on the heartbeat sent before, a delta lists the 5 jobs of one
    interval whatever the lag (260 heartbeats: beyond MAX_LAG), and the manager's
    copy follows every one of them to the final set."""
    lag = 260
    sent, verdicts, views, final = _behind_through_a_fill(
        monkeypatch, lag, 400 + lag + 20, 400, per_step=5, stop_every=10, chain=True
    )
    first_chained = next(i for i, hb in enumerate(sent) if hb.chained)
    assert first_chained == lag + 1  # after the first acknowledgement arrived
    after = sent[first_chained:]
    assert all(hb.chained and hb.base == hb.seq - 1 for hb in after)
    assert max(len(hb.jobs) for hb in after) == 5
    assert max(len(hb.gone) for hb in after) <= 1
    assert Verdict.FULL not in verdicts
    assert views.running("s1") == frozenset(final) and len(final) == 1960
    # The same fill answered by a manager of the previous version (no ``chain``):
    # deltas on the acknowledged heartbeat, then complete listings past patience.
    sent, _, _, _ = _behind_through_a_fill(
        monkeypatch, lag, 400 + lag + 20, 400, per_step=5, stop_every=10
    )
    assert not any(hb.chained for hb in sent)
    assert max(len(hb.jobs) for hb in sent[lag + 1 :]) >= 900


def test_a_heartbeat_not_published_is_followed_by_a_complete_listing() -> None:
    series, views = HeartbeatSeries(), ServerViews(stale_after=60.0)
    first = _chained(series, A)
    _answer(series, first, views.receive(first), chain=True)
    second = _chained(series, A, B)
    assert (second.chained, second.base, second.jobs) == (True, first.seq, (B,))
    assert views.receive(second) is Verdict.ACK
    lost = _chained(series, A, B, C, published=False)
    assert lost.chained
    after = _chained(series, A, B, C)
    assert (after.chained, after.base, set(after.jobs)) == (False, 0, {A, B, C})
    assert views.receive(after) is Verdict.ACK
    # And one built while the one before was never reported on is not chained either.
    series.next(_reports(A, B, C))
    again = _hb(series.next(_reports(A, B, C)))
    assert (series.chained, again.base) == (False, 0)


def test_a_manager_without_the_copy_asks_once_for_the_chained_deltas_queued_before_it_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new manager (or one whose copy was dropped) finds a hundred chained
    deltas of a server waiting in its events queue: it asks for a complete
    listing on the first, applies the others for what they say without asking
    again (the server sent them before it could read the request), asks again
    for a delta sent after the request had time to arrive (it was lost), and
    follows chained deltas on the complete listing once that arrives."""
    clock = _Clock()
    monkeypatch.setattr(server_views_module, "time", clock)
    series, first_manager = HeartbeatSeries(), ServerViews(stale_after=3600.0)
    first = _chained(series, A, sent_at=clock.now)
    _answer(series, first, first_manager.receive(first), chain=True)
    queued = []
    for _ in range(100):
        clock.now += 2.0
        queued.append(_chained(series, A, B, sent_at=clock.now))
    assert all(hb.chained for hb in queued)
    clock.now += 60.0  # a new manager starts, a minute behind
    views = ServerViews(stale_after=3600.0)
    verdicts = [views.receive(hb) for hb in queued]
    assert verdicts == [Verdict.FULL] + [Verdict.NOTHING] * 99
    clock.now += 2.0 + server_views_module.ACK_GRACE
    late = _chained(series, A, B, sent_at=clock.now)  # the request never arrived
    assert views.receive(late) is Verdict.FULL
    series.acknowledged(p.HeartbeatAck(seq=late.seq, full=True, chain=True))
    complete = _chained(series, A, B, sent_at=clock.now)
    assert (complete.base, complete.chained) == (0, False)
    assert views.receive(complete) is Verdict.ACK
    series.acknowledged(p.HeartbeatAck(seq=complete.seq, chain=True))
    clock.now += 2.0
    change = _chained(series, A, C, sent_at=clock.now)
    assert (change.chained, change.jobs, change.gone) == (True, (C,), ("b",))
    assert views.receive(change) is Verdict.ACK
    assert views.running("s1") == frozenset({"a", "c"})


def test_a_chained_delta_delivered_again_or_after_a_gap_is_never_applied_to_the_copy() -> None:
    series, views = HeartbeatSeries(), ServerViews(stale_after=60.0)
    first = _chained(series, A)
    _answer(series, first, views.receive(first), chain=True)
    second = _chained(series, A, B)
    assert views.receive(second) is Verdict.ACK
    assert views.receive(second) is Verdict.NOTHING  # delivered again: nothing twice
    assert views.running("s1") == frozenset({"a", "b"})
    _chained(series, A, B, C)  # published, but never reaches this manager
    fourth = _chained(series, A, C)
    assert (fourth.base, fourth.gone) == (fourth.seq - 1, ("b",))
    assert views.receive(fourth) is Verdict.FULL  # its base is not the copy's
    assert views.running("s1") is None


def test_a_chained_delta_with_refused_copies_asks_for_a_complete_listing() -> None:
    """A chained delta lists a job once: the conflict a refused copy raises is
    raised again by the complete listing asked for, as long as the copy runs."""
    series, views = HeartbeatSeries(), ServerViews(stale_after=60.0)
    first = _chained(series, A)
    _answer(series, first, views.receive(first), chain=True)
    delta = _chained(series, A, B)
    assert delta.chained
    assert views.receive(delta, refused=True) is Verdict.FULL
    series.acknowledged(p.HeartbeatAck(seq=delta.seq, full=True, chain=True))
    assert _chained(series, A, B).base == 0


def test_a_server_goes_back_to_deltas_on_acknowledgements_for_an_older_manager() -> None:
    """The events move to a manager of the previous version: it lacks the copy,
    asks for a complete listing without ``chain``, and from then on the server's
    deltas are on its acknowledgements again."""
    series, views = HeartbeatSeries(), ServerViews(stale_after=60.0)
    first = _chained(series, A)
    _answer(series, first, views.receive(first), chain=True)
    assert _chained(series, A, B).chained
    series.acknowledged(p.HeartbeatAck(seq=series.seq, full=True))  # an older manager
    complete = _chained(series, A, B)
    assert complete.base == 0
    series.acknowledged(p.HeartbeatAck(seq=complete.seq))
    delta = _chained(series, A, B, C)
    assert (delta.chained, delta.base, delta.jobs) == (False, complete.seq, (C,))
    body = json.loads(p.encode(delta))
    assert "chained" not in body


def test_chained_and_chain_round_trip_and_are_left_out_when_false() -> None:
    delta = dataclasses.replace(_hb((9, 8, (A,), ("b",), 5, 1)), chained=True)
    assert json.loads(p.encode(delta))["chained"] is True
    assert p.decode(p.encode(delta)) == delta
    ack = p.HeartbeatAck(seq=9, chain=True)
    assert p.decode(p.encode(ack)) == ack
    assert p.decode(p.encode(p.HeartbeatAck(seq=9))) == p.HeartbeatAck(seq=9, chain=False)
    body = json.loads(p.encode(delta))
    body["chained"] = "yes"
    with pytest.raises(MalformedMessage, match="chained"):
        p.decode(json.dumps(body))


async def test_a_fleet_runs_on_chained_deltas_and_a_restarted_manager_converges(
    cluster: Cluster,
) -> None:
    """End to end on the memory transport: the manager's acknowledgements say
    ``chain``, the server's heartbeats become chained deltas (empty while nothing
    changes), jobs that start later are listed once, and a restarted manager
    gets a complete listing and follows the chain again."""
    await cluster.start_manager()
    server = await cluster.add_server("a", 10)
    ids = await cluster.create(4)
    await cluster.wait_running(ids)
    await eventually(lambda: server._beats.chained, what="a chained heartbeat")
    seen = _heartbeats_applied(cluster)
    more = await cluster.create(2, prefix="later")
    await cluster.wait_running(more)
    await eventually(lambda: len(seen) >= 3, what="three heartbeats applied")
    assert all(hb.chained for hb in seen)
    listed = [job.job_id for hb in seen for job in hb.jobs]
    assert set(more) <= set(listed) and not set(ids) & set(listed)
    assert cluster.manager is not None
    await cluster.manager.stop()
    manager = await cluster.start_manager(dataclasses.replace(FAST_MANAGER))
    seen = _heartbeats_applied(cluster)
    await eventually(
        lambda: any(not hb.base for hb in seen) and seen[-1].chained,
        what="a complete listing, then chained deltas",
    )
    assert manager._views.running(server.id) == frozenset([*ids, *more])
    for job_id in [*ids, *more]:
        record = await cluster.job(job_id)
        assert (record.status, record.server_id) == (JobStatus.PROCESSING, server.id)


async def test_the_pump_builds_each_heartbeat_in_its_turn_replacing_the_starts_behind() -> None:
    """A chained heartbeat is relative to the one published before it, so the
    event pump builds each heartbeat when its turn comes (not when it is
    queued) and tells the series whether it went out. Built then, it may list a
    job whose start report waits behind it: it replaces that report (as a
    coalescing heartbeat does), else the manager would apply the start from the
    listing and, reading the start report after, no longer see the job's
    previous owner to tell to stop its copy."""
    from orchestratr_core.server.outbox import EventOutbox

    series = HeartbeatSeries()
    running: dict[str, p.RunningJob] = {}
    published: list[p.Event] = []
    outcomes: list[tuple[int, bool]] = []
    failing = False

    async def send(event: p.Event) -> None:
        if failing and isinstance(event, p.ServerHeartbeat):
            raise ConnectionResetError("the broker went away")
        published.append(event)

    def heartbeat(listing: Any) -> p.ServerHeartbeat:
        hb = _hb(series.next(_reports(*running.values()), listing))
        return dataclasses.replace(hb, chained=series.chained)

    def sent(seq: int, ok: bool) -> None:
        outcomes.append((seq, ok))
        series.sent(seq, ok)

    outbox = EventOutbox(send, heartbeat, running.__len__, 2.0, sent)
    outbox.publish_heartbeat()
    outbox.publish_heartbeat()  # two queued before the job started: one is built
    running["a"] = A
    outbox.publish(p.JobStarted(server_id="s1", job_id="a", fence=A.fence, at=1.0))
    pump = asyncio.ensure_future(outbox.pump())
    try:
        await asyncio.wait_for(outbox.queue.join(), 5)
        assert [type(e).__name__ for e in published] == ["ServerHeartbeat"], published
        (first,) = published
        assert isinstance(first, p.ServerHeartbeat)
        assert (first.seq, first.jobs, first.started) == (1, (A,), ("a",))
        assert outcomes == [(1, True)]
        series.acknowledged(p.HeartbeatAck(seq=1, chain=True))
        running["b"] = B
        outbox.publish_heartbeat()
        await asyncio.wait_for(outbox.queue.join(), 5)
        second = published[-1]
        assert isinstance(second, p.ServerHeartbeat)
        assert (second.chained, second.base, second.jobs) == (True, 1, (B,))
        failing = True
        outbox.publish_heartbeat()
        await asyncio.wait_for(outbox.queue.join(), 10)
        assert outcomes[-1] == (3, False)
        failing = False
        outbox.publish_heartbeat()
        await asyncio.wait_for(outbox.queue.join(), 5)
        fourth = published[-1]
        assert isinstance(fourth, p.ServerHeartbeat)
        assert (fourth.seq, fourth.base, fourth.chained, len(fourth.jobs)) == (4, 0, False, 2)
    finally:
        pump.cancel()


def test_a_request_for_a_complete_listing_that_comes_while_a_heartbeat_is_published_is_kept() -> (
    None
):
    series, views = HeartbeatSeries(), ServerViews(stale_after=60.0)
    first = _chained(series, A)
    _answer(series, first, views.receive(first), chain=True)
    in_flight = _hb(series.next(_reports(A, B)))
    assert series.chained
    assert series.acknowledged(p.HeartbeatAck(seq=first.seq, full=True, chain=True))
    series.sent(in_flight.seq)  # its publish ends after the request came
    complete = _chained(series, A, B)
    assert (complete.chained, complete.base, set(complete.jobs)) == (False, 0, {A, B})
    assert _chained(series, A, B).chained  # and the next is chained on it
