"""A held job converges to its final-until-resumed status although the stop
report of its live owner never reaches a manager (lost on the way, or sent to a
manager that restarted), and a fleet with a server of the version before the
lifecycle controls (its message shapes) keeps working through a pause.

Memory backends, the real manager and storage, real servers (except the older
server, whose messages are written as that version wrote them)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from orchestratr_core import JobArgument, JobStatus, StopToken
from orchestratr_core import protocol as p
from orchestratr_core.runner import Heartbeat
from orchestratr_core.server import OrchestratedServer
from orchestratr_core.server_views import Verdict
from tests.support.cluster import FAST_MANAGER, FAST_SERVER, Cluster, eventually

HOLD_BOUND = FAST_SERVER.heartbeat_interval + FAST_SERVER.stop_grace + 0.5
CONFIRM_AFTER = 1.5
CONVERGING = dataclasses.replace(FAST_MANAGER, confirm_hold_after=CONFIRM_AFTER)

# What the StopReason of the version before the lifecycle controls could read.
OLDER_STOP_REASONS = {"cancelled", "released", "superseded", "lost", "completed", "watchdog"}


def _lose_stop_reports(server: OrchestratedServer) -> list[p.JobStopped]:
    """Make ``server`` lose every ``JobStopped`` it sends (returned as they go)."""
    outbox = server._outbox
    publish = outbox.publish
    lost: list[p.JobStopped] = []

    def publish_all_but_stops(event: p.Event) -> None:
        if isinstance(event, p.JobStopped):
            lost.append(event)
        else:
            publish(event)

    outbox.publish = publish_all_but_stops  # type: ignore[method-assign]
    return lost


def _slow_to_stop(cluster: Cluster, server: str, linger: float) -> object:
    """A job that takes ``linger`` seconds to honour its stop token."""

    async def body(arg: JobArgument, token: StopToken, heartbeat: Heartbeat) -> None:
        while not token.stop_requested:
            heartbeat()
            await token.sleep(0.05)
        await asyncio.sleep(linger)  # a clean-up that takes a while

    return cluster.ledger.job(server, body=body)


async def test_a_pause_whose_stop_report_is_lost_is_confirmed_while_the_owner_lives(
    cluster: Cluster,
) -> None:
    await cluster.start_manager(CONVERGING)
    server = await cluster.add_server("a", 2, job=_slow_to_stop(cluster, "a", 0.5))
    (job_id,) = await cluster.create(1, "lost-stop")
    await cluster.wait_status(job_id, JobStatus.PROCESSING)
    lost = _lose_stop_reports(server)
    paused_at = time.monotonic()
    await cluster.client.pause(job_id)
    await eventually(lambda: not cluster.ledger.running(job_id), HOLD_BOUND, what="stopped")
    assert [e.reason for e in lost] == [p.StopReason.HELD]
    # Not before the bound: a copy being stopped is left out of heartbeats already.
    assert (await cluster.job(job_id)).status is JobStatus.PAUSING
    record = await cluster.wait_status(job_id, JobStatus.PAUSED, timeout=CONFIRM_AFTER + 5)
    assert time.monotonic() - paused_at >= CONFIRM_AFTER
    assert record.server_id is None
    assert "no longer runs it" in (record.reason or "")
    (alive,) = await cluster.monitor.servers()
    assert alive.status.value == "alive"  # not the dead-server path
    resumed = await cluster.client.resume(job_id)
    assert resumed.status is JobStatus.PENDING
    await cluster.wait_running([job_id])
    assert len(cluster.ledger.running(job_id)) == 1
    assert cluster.ledger.overlaps() == []


async def test_a_stuck_pause_converges_after_the_manager_restarts(cluster: Cluster) -> None:
    """The stop report went to a manager that then stopped (and its replacement
    never sees it): the new manager asks for a complete listing, which leaves
    the job out, and confirms the pause after the bound."""
    manager = await cluster.start_manager()  # the default bound: 30 s
    server = await cluster.add_server("a", 2)
    (job_id,) = await cluster.create(1, "restart")
    await cluster.wait_status(job_id, JobStatus.PROCESSING)
    _lose_stop_reports(server)
    await cluster.client.pause(job_id)
    await eventually(lambda: not cluster.ledger.running(job_id), HOLD_BOUND, what="stopped")
    await eventually(lambda: server._beats.base > 0, what="a delta acknowledged")
    await manager.stop()
    await cluster.storage.open()  # the manager closed it
    assert (await cluster.job(job_id)).status is JobStatus.PAUSING
    await cluster.start_manager(CONVERGING)
    record = await cluster.wait_status(job_id, JobStatus.PAUSED, timeout=CONFIRM_AFTER + 5)
    assert record.server_id is None
    assert cluster.ledger.running(job_id) == []


async def test_a_quarantine_whose_stop_report_is_lost_releases_its_owner(
    cluster: Cluster,
) -> None:
    async def crashing(arg: JobArgument, token: StopToken, heartbeat: Heartbeat) -> None:
        raise RuntimeError("cannot reach the feed")

    await cluster.start_manager(CONVERGING)
    server = await cluster.add_server("a", 2, job=crashing)
    _lose_stop_reports(server)
    job_id = await cluster.client.create_job("crash", "", max_restarts=1)
    quarantined = await cluster.wait_status(job_id, JobStatus.QUARANTINED)
    reason = quarantined.reason
    assert reason is not None and "restart budget spent" in reason

    async def released() -> bool:
        job = await cluster.job(job_id)
        return job.status is JobStatus.QUARANTINED and job.server_id is None

    await eventually(released, CONFIRM_AFTER + 5, what="owner released")
    assert (await cluster.job(job_id)).reason == reason  # the reason is kept
    resumed = await cluster.client.resume(job_id)
    assert resumed.status is JobStatus.PENDING  # resume no longer waits for ever


def _older_heartbeat(server_id: str, jobs: list[tuple[str, int]]) -> p.ServerHeartbeat:
    """A heartbeat as a server before the lifecycle controls wrote it: no ``seq``,
    ``base``, ``gone``, ``digest``, ``kinds`` or ``labels``; jobs as objects with
    no checkpoint."""
    body = {
        "v": 1,
        "type": "heartbeat",
        "server_id": server_id,
        "name": "old",
        "max_workers": 10,
        "started_at": time.time() - 60,
        "sent_at": time.time(),
        "host": "h",
        "pid": 1,
        "draining": False,
        "jobs": [
            {"job_id": job_id, "fence": fence, "last_heartbeat": None, "restarts": 0}
            for job_id, fence in jobs
        ],
    }
    return p.decode_as(json.dumps(body).encode(), p.ServerHeartbeat)


def _older_stopped(server_id: str, job_id: str, fence: int, reason: str) -> p.JobStopped:
    """A stop report without ``forced`` and ``error``, as that version wrote it."""
    body = {
        "v": 1,
        "type": "stopped",
        "server_id": server_id,
        "job_id": job_id,
        "fence": fence,
        "reason": reason,
        "at": time.time(),
    }
    return p.decode_as(json.dumps(body).encode(), p.JobStopped)


async def test_a_pause_works_on_a_server_of_the_version_before_the_lifecycle_controls(
    cluster: Cluster,
) -> None:
    """Mixed fleet during an upgrade. The older server cannot read hold marks nor
    the stop reason ``held``: the manager stops its copy of a paused job with a
    reason it reads (``superseded``, up to that copy's fence), its stop report
    confirms the pause, and a resumed job's new generation is not covered."""
    manager = await cluster.start_manager(CONVERGING)
    sent: list[tuple[p.Command, str | None]] = []
    send = manager.transport.send_command

    async def spy(command: p.Command, server_id: str | None = None) -> None:
        sent.append((command, server_id))
        await send(command, server_id)

    manager._transport.send_command = spy  # type: ignore[method-assign]
    job_id, other = await cluster.create(2, "mixed")
    fence = 1 << 32
    await manager._on_event(_older_heartbeat("old-1", [(job_id, fence), (other, fence)]))
    assert (await cluster.job(job_id)).status is JobStatus.PROCESSING

    await cluster.client.pause(job_id)
    # The older server still runs it (it ignored the hold mark): told to stop.
    await manager._on_event(_older_heartbeat("old-1", [(job_id, fence), (other, fence)]))
    stops = [c for c, target in sent if isinstance(c, p.StopJob) and target == "old-1"]
    assert [(s.job_id, s.drop, s.max_fence) for s in stops] == [(job_id, True, fence)]
    wire = json.loads(p.encode(stops[0]))
    assert wire["reason"] in OLDER_STOP_REASONS, wire
    assert not [c for c, _ in sent if isinstance(c, p.HeartbeatAck)]  # it cannot read one

    await manager._on_event(_older_stopped("old-1", job_id, fence, wire["reason"]))
    paused = await cluster.job(job_id)
    assert (paused.status, paused.server_id) == (JobStatus.PAUSED, None)
    assert (await cluster.job(other)).status is JobStatus.PROCESSING  # untouched

    resumed = await cluster.client.resume(job_id)
    assert resumed.status is JobStatus.PENDING
    assert resumed.generation == paused.generation + 1
    assert (resumed.generation << 32) > fence  # the stop does not cover the new message
    assert manager._views.receive(_older_heartbeat("old-1", [(other, fence)])) is Verdict.NOTHING


async def test_a_failure_of_the_generation_before_a_resume_is_not_counted(
    cluster: Cluster,
) -> None:
    """A failure counted late -- its copy belonged to the generation before a
    resume -- must not spend the fresh budget (with ``max_restarts=0`` it would
    quarantine the resumed job at once)."""
    from orchestratr_core.job import JobEvent, make_fence, utcnow

    manager = await cluster.start_manager()
    job_id = await cluster.client.create_job("late-count", "", max_restarts=0)
    job = await cluster.job(job_id)
    fence = make_fence(job.generation, 0)
    now = utcnow()
    started = await cluster.storage.transition(
        job_id, JobEvent.START, server_id="s1", fence=fence, now=now
    )
    assert started.applied
    await manager._count_failure(job_id, time.time(), "boom", now, generation=job.generation)
    assert (await cluster.job(job_id)).status is JobStatus.QUARANTINED
    await cluster.storage.transition(
        job_id, JobEvent.CONFIRM_HELD, server_id="s1", fence=fence, now=now
    )
    resumed = await cluster.client.resume(job_id)
    assert resumed.status is JobStatus.PENDING
    await manager._count_failure(job_id, time.time(), "late", utcnow(), generation=job.generation)
    after = await cluster.job(job_id)
    assert after.status is JobStatus.PENDING
    assert after.failure_seq == resumed.failure_seq
    assert after.failure_log is None
