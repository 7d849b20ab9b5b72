"""The lifecycle controls end to end on the memory backends: pause and resume (one
job and a selection), checkpoints handed to the next owner, the hold marks the
servers honour, and what older message shapes still mean."""

from __future__ import annotations

import asyncio
import functools
import json
import time

import pytest

from orchestratr_core import InvalidJobInput, JobArgument, JobStatus, StopToken
from orchestratr_core import protocol as p
from orchestratr_core.errors import ConfigurationError
from orchestratr_core.lifecycle import MAX_CHECKPOINT_BYTES, checkpointed, hold_mark, parse_hold
from orchestratr_core.runner import Heartbeat
from orchestratr_core.server.runtime import AVOID_BOUNCES
from tests.support.cluster import FAST_SERVER, Cluster, eventually

# A hold reaches a running copy as a broadcast; it then stops within the grace.
HOLD_BOUND = FAST_SERVER.heartbeat_interval + FAST_SERVER.stop_grace + 0.5


def _counter_job(cluster: Cluster, server: str, seen: list[tuple[str, str | None]]) -> object:
    """A job that counts from its checkpoint, recording one checkpoint per step."""

    async def job(arg: JobArgument, token: StopToken, heartbeat: Heartbeat) -> None:
        seen.append((server, arg.checkpoint))

        async def body(arg: JobArgument, token: StopToken, _: object) -> None:
            count = int(arg.checkpoint or "0")
            while not token.stop_requested:
                count += 1
                heartbeat(checkpoint=str(count))
                await token.sleep(0.05)

        await cluster.ledger.job(server, body=body)(arg, token, heartbeat)

    return checkpointed(job)


async def test_pause_stops_a_running_job_and_resume_starts_it_again_once(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 5)
    await cluster.add_server("b", 5)
    (job_id,) = await cluster.create(1, "paused")
    await cluster.wait_running([job_id])
    before = await cluster.job(job_id)

    paused = await cluster.client.pause(job_id)
    assert paused.status in (JobStatus.PAUSING, JobStatus.PAUSED)
    t0 = time.monotonic()
    await eventually(lambda: not cluster.ledger.running(job_id), HOLD_BOUND, what="stopped")
    assert time.monotonic() - t0 < HOLD_BOUND
    record = await cluster.wait_status(job_id, JobStatus.PAUSED)
    assert record.server_id is None
    # Held means held: nothing starts it while paused, on either server.
    await asyncio.sleep(4 * FAST_SERVER.heartbeat_interval)
    assert cluster.ledger.running(job_id) == []
    assert (await cluster.job(job_id)).status is JobStatus.PAUSED

    resumed = await cluster.client.resume(job_id)
    assert resumed.status is JobStatus.PENDING
    assert resumed.generation == before.generation + 1
    await cluster.wait_running([job_id])
    started = await cluster.wait_status(job_id, JobStatus.PROCESSING)
    assert started.fence > before.fence
    assert cluster.ledger.overlaps() == []
    assert cluster.ledger.fences_grow()


async def test_a_job_paused_while_queued_never_starts(cluster: Cluster) -> None:
    await cluster.start_manager()
    (job_id,) = await cluster.create(1, "queued")
    await cluster.client.pause(job_id)
    await cluster.add_server("late", 2)
    await cluster.wait_status(job_id, JobStatus.PAUSED)
    assert cluster.ledger.of(job_id) == []
    await cluster.client.resume(job_id)
    await cluster.wait_running([job_id])


async def test_a_pause_outlives_the_server_and_a_new_server_does_not_start_it(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 2)
    (job_id,) = await cluster.create(1, "outlive")
    await cluster.wait_running([job_id])
    await cluster.client.pause(job_id)
    await cluster.servers["a"].kill()  # before or after it confirmed: either way held
    await cluster.add_server("b", 2)
    await cluster.wait_status(job_id, JobStatus.PAUSED, timeout=15)
    await asyncio.sleep(3 * FAST_SERVER.heartbeat_interval)
    assert cluster.ledger.running(job_id) == []


async def test_pause_and_resume_a_selection_by_name_prefix(cluster: Cluster) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 10)
    tenant = await cluster.create(3, "tenant-x")
    other = await cluster.create(2, "tenant-y")
    await cluster.wait_running(tenant + other)
    changed = await cluster.client.pause_jobs(name_prefix="tenant-x")
    assert sorted(job.id for job in changed) == sorted(tenant)
    for job_id in tenant:
        await cluster.wait_status(job_id, JobStatus.PAUSED)
    assert all(len(cluster.ledger.running(j)) == 1 for j in other)
    resumed = await cluster.client.resume_jobs(name_prefix="tenant-x")
    assert sorted(job.id for job in resumed) == sorted(tenant)
    await cluster.wait_running(tenant + other)


async def test_a_kind_selection_holds_only_jobs_of_that_kind(cluster: Cluster) -> None:
    """Until job kinds exist every job is of the default kind."""
    await cluster.start_manager()
    await cluster.add_server("a", 10)
    ids = await cluster.create(2, "kinded")
    await cluster.wait_running(ids)
    assert await cluster.client.pause_jobs(kind="socket") == []
    changed = await cluster.client.pause_jobs(kind="default")
    assert sorted(job.id for job in changed) == sorted(ids)
    with pytest.raises(InvalidJobInput):
        await cluster.client.pause_jobs()


async def test_cancel_of_a_paused_job_deletes_it_at_once(cluster: Cluster) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 2)
    (job_id,) = await cluster.create(1, "gone")
    await cluster.wait_running([job_id])
    await cluster.client.pause(job_id)
    await cluster.wait_status(job_id, JobStatus.PAUSED)
    record = await cluster.client.mark_on_deleting(job_id)
    assert record.status is JobStatus.DELETED
    assert (await cluster.client.resume(job_id)).status is JobStatus.DELETED


async def test_the_next_owner_starts_from_the_last_checkpoint_after_a_kill(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    seen: list[tuple[str, str | None]] = []
    await cluster.add_server("a", 2, job=_counter_job(cluster, "a", seen))
    (job_id,) = await cluster.create(1, "counter")
    await cluster.wait_running([job_id])

    async def stored() -> int:
        record = await cluster.job(job_id)
        return int(record.checkpoint or "0")

    await eventually(lambda: _at_least(stored(), 5), what="checkpoints stored")
    await cluster.add_server("b", 2, job=_counter_job(cluster, "b", seen))
    last = await stored()
    await cluster.servers["a"].kill()
    await eventually(lambda: any(server == "b" for server, _ in seen), what="moved to b")
    moved = next(cp for server, cp in seen if server == "b")
    assert moved is not None
    # The last checkpoint that reached the manager (or a later one), never an older one.
    assert int(moved) >= last
    record = await cluster.job(job_id)
    assert record.checkpoint_fence is not None and record.checkpoint_fence <= record.fence


async def test_resume_hands_the_checkpoint_in_the_new_message(cluster: Cluster) -> None:
    await cluster.start_manager()
    seen: list[tuple[str, str | None]] = []
    await cluster.add_server("a", 2, job=_counter_job(cluster, "a", seen))
    (job_id,) = await cluster.create(1, "resumed")
    await cluster.wait_running([job_id])
    assert seen == [("a", None)]  # the first start has no checkpoint

    async def stored() -> int:
        return int((await cluster.job(job_id)).checkpoint or "0")

    await eventually(lambda: _at_least(stored(), 3), what="checkpoints stored")
    await cluster.client.pause(job_id)
    await cluster.wait_status(job_id, JobStatus.PAUSED)
    last = await stored()
    await cluster.client.resume(job_id)
    await eventually(lambda: len(seen) == 2, what="started again")
    assert seen[1] == ("a", str(last))


async def _at_least(value: object, n: int) -> bool:
    assert asyncio.iscoroutine(value)
    return int(await value) >= n


async def test_an_oversized_checkpoint_is_a_clear_error_in_the_job(cluster: Cluster) -> None:
    errors: list[str] = []

    async def job(arg: JobArgument, token: StopToken, heartbeat: Heartbeat) -> None:
        try:
            heartbeat(checkpoint="x" * (MAX_CHECKPOINT_BYTES + 1))
        except InvalidJobInput as exc:
            errors.append(str(exc))
        heartbeat(checkpoint="ok")
        await token.wait()

    await cluster.start_manager()
    await cluster.add_server("a", 1, job=job)
    (job_id,) = await cluster.create(1, "big")
    await eventually(lambda: errors, what="the error")
    assert f"the limit is {MAX_CHECKPOINT_BYTES} bytes" in errors[0]
    record = await eventually(lambda: _checkpoint_is(cluster, job_id, "ok"), what="stored")
    assert record


async def _checkpoint_is(cluster: Cluster, job_id: str, value: str) -> bool:
    return (await cluster.job(job_id)).checkpoint == value


# -- the wire: hold marks and older message shapes -----------------------------------------


def test_hold_marks_round_trip_and_plain_ids_are_no_holds() -> None:
    job_id = "01a24930-c714-7000-bb7f-352412901148"
    assert parse_hold(hold_mark(job_id, 7)) == (job_id, 7)
    assert parse_hold(job_id) is None
    assert parse_hold(f"{job_id}@") is None
    assert parse_hold(f"{job_id}@-1") is None
    assert parse_hold(f"{job_id}@99999999999") is None
    assert parse_hold(f"{'x' * 40}@1") is None
    cancel = p.decode(p.encode(p.CancelJob(job_id=hold_mark(job_id, 2**31 - 1))))
    assert isinstance(cancel, p.CancelJob)


def test_an_older_servers_heartbeat_without_checkpoints_still_decodes() -> None:
    """Mixed fleet: a server of the previous version writes four values per job
    (and the object form before that); a newer one may append values we ignore."""
    old = {
        "v": 1,
        "type": "heartbeat",
        "server_id": "s",
        "name": "n",
        "max_workers": 2,
        "started_at": 1.0,
        "sent_at": 2.0,
        "jobs": [
            ["a", 5, None, 0],
            {"job_id": "b", "fence": 6, "last_heartbeat": 1.5, "restarts": 1},
            ["c", 7, 2.0, 0, "cp", "future value"],
        ],
    }
    hb = p.decode(json.dumps(old))
    assert isinstance(hb, p.ServerHeartbeat)
    assert [(j.job_id, j.checkpoint) for j in hb.jobs] == [("a", None), ("b", None), ("c", "cp")]
    old_job = {
        "v": 1,
        "type": "job",
        "job_id": "j",
        "name": "n",
        "argument": "",
        "generation": 1,
        "created_at": 1.0,
    }
    message = p.decode(json.dumps(old_job))
    assert isinstance(message, p.JobMessage)
    assert message.checkpoint is None


def test_a_checkpoint_over_the_limit_or_of_the_wrong_type_is_malformed() -> None:
    from orchestratr_core.errors import MalformedMessage

    base = {
        "v": 1,
        "type": "heartbeat",
        "server_id": "s",
        "name": "n",
        "max_workers": 2,
        "started_at": 1.0,
        "sent_at": 2.0,
    }
    for bad in (["a", 5, None, 0, 7], ["a", 5, None, 0, "x" * (MAX_CHECKPOINT_BYTES + 1)]):
        with pytest.raises(MalformedMessage):
            p.decode(json.dumps({**base, "jobs": [bad]}))


# -- crash-loop containment ---------------------------------------------------------------


async def test_a_job_that_keeps_raising_is_quarantined_with_its_errors_and_resume_releases_it(
    cluster: Cluster,
) -> None:
    runs: list[int] = []

    async def failing(arg: JobArgument, token: StopToken, heartbeat: Heartbeat) -> None:
        runs.append(arg.fence)
        raise RuntimeError(f"bad config #{len(runs)}")

    await cluster.start_manager()
    await cluster.add_server("a", 2, job=failing)
    job_id = await cluster.client.create_job("crashy", "", max_restarts=2, restart_window=60)
    record = await cluster.wait_status(job_id, JobStatus.QUARANTINED)
    assert record.reason is not None and "restart budget spent: 3 failures" in record.reason
    errors = record.to_dict()["last_errors"]
    assert isinstance(errors, list) and len(errors) == 3
    assert "RuntimeError: bad config #3" in str(errors[-1])
    await eventually(lambda: _unowned(cluster, job_id), what="confirmed stopped")
    count = len(runs)
    await asyncio.sleep(4 * FAST_SERVER.heartbeat_interval)
    assert len(runs) == count  # it does not cycle on: held until resumed
    resumed = await cluster.client.resume(job_id)
    assert resumed.status is JobStatus.PENDING
    assert resumed.to_dict()["last_errors"] == []
    await eventually(lambda: len(runs) > count, what="runs again after resume")
    await cluster.wait_status(job_id, JobStatus.QUARANTINED)


async def _unowned(cluster: Cluster, job_id: str) -> bool:
    return (await cluster.job(job_id)).server_id is None


async def test_owner_deaths_count_against_the_budget(cluster: Cluster) -> None:
    """A job that kills its host: every death of its server counts; the job is
    quarantined instead of cycling through the fleet."""
    await cluster.start_manager()
    for name in ("a", "b", "c"):
        await cluster.add_server(name, 2)
    job_id = await cluster.client.create_job("killer", "", max_restarts=1, restart_window=600)
    for deaths in (1, 2):
        await cluster.wait_running([job_id])
        (copy,) = cluster.ledger.running(job_id)
        await cluster.servers[copy.server].kill()
        counted = functools.partial(_failures, cluster, job_id, deaths)
        await eventually(counted, 10, what="death counted")
    record = await cluster.wait_status(job_id, JobStatus.QUARANTINED)
    assert "owner died" in (record.reason or "")
    await eventually(lambda: not cluster.ledger.running(job_id), HOLD_BOUND, what="held")


async def _failures(cluster: Cluster, job_id: str, n: int) -> bool:
    return (await cluster.job(job_id)).failure_seq >= n


def test_restart_budget_input_is_checked() -> None:
    from orchestratr_core.lifecycle import validate_restart_budget

    assert validate_restart_budget(None, None) == (None, None)
    assert validate_restart_budget(3, 60) == (3, 60.0)
    for bad in ((-1, None), (True, None), ("3", None), (None, 0), (None, -5), (None, 10**9)):
        with pytest.raises(InvalidJobInput):
            validate_restart_budget(*bad)


async def test_a_graceful_hand_over_counts_no_failure(cluster: Cluster) -> None:
    """Released jobs start elsewhere, sometimes before the manager has the release
    (two servers' events are not ordered): no owner death is counted."""
    await cluster.start_manager()
    await cluster.add_server("a", 10)
    ids = await cluster.create(8, "handed")
    await cluster.wait_running(ids)
    await cluster.add_server("b", 10)
    await cluster.servers["a"].stop()
    await cluster.wait_running(ids)
    await asyncio.sleep(FAST_SERVER.heartbeat_interval + 1.6)  # past a's expiry
    assert [(await cluster.job(j)).failure_seq for j in ids] == [0] * len(ids)


async def test_an_unmarked_job_fails_over_at_once_even_without_a_manager(cluster: Cluster) -> None:
    """Only a :func:`checkpointed` function waits for the manager's checkpoint on a
    redelivery: others keep the failover bound, also while no manager runs."""
    await cluster.start_manager()
    await cluster.add_server("a", 2)
    await cluster.add_server("b", 2)
    (job_id,) = await cluster.create(1, "plain")
    await cluster.wait_running([job_id])
    assert cluster.manager is not None
    await cluster.manager.stop()
    (copy,) = cluster.ledger.running(job_id)
    await cluster.servers[copy.server].kill()
    t0 = time.monotonic()
    await cluster.wait_running([job_id], timeout=3)
    assert time.monotonic() - t0 < 1.5


async def test_a_pause_is_confirmed_when_the_owner_dies_before_its_stop_report(
    cluster: Cluster,
) -> None:
    """The owner stops the held copy (and drops its message) but dies before its
    ``JobStopped`` reaches the manager: the manager's dead-server handling
    confirms the pause, so the job does not stay ``pausing`` and resume works."""
    await cluster.start_manager()
    server = await cluster.add_server("a", 2)
    (job_id,) = await cluster.create(1, "stuck")
    await cluster.wait_running([job_id])
    await cluster.wait_status(job_id, JobStatus.PROCESSING)  # the storage knows its owner
    outbox = server._outbox
    publish = outbox.publish

    def lose_stop_reports(event: p.Event) -> None:
        if not isinstance(event, p.JobStopped):
            publish(event)

    outbox.publish = lose_stop_reports  # type: ignore[method-assign]
    await cluster.client.pause(job_id)
    await eventually(lambda: not cluster.ledger.running(job_id), HOLD_BOUND, what="stopped")
    await asyncio.sleep(2 * FAST_SERVER.heartbeat_interval)
    assert (await cluster.job(job_id)).status is JobStatus.PAUSING  # the report was lost
    await server.kill()
    record = await cluster.wait_status(job_id, JobStatus.PAUSED, timeout=15)
    assert record.server_id is None
    await cluster.add_server("b", 2)
    resumed = await cluster.client.resume(job_id)
    assert resumed.status is JobStatus.PENDING
    await cluster.wait_running([job_id])
    assert [copy.server for copy in cluster.ledger.running(job_id)] == ["b"]
    assert cluster.ledger.overlaps() == []


async def test_after_failures_in_a_row_the_next_start_is_on_a_different_server(
    cluster: Cluster,
) -> None:
    """A job that raises on one server only: after ``move_after_failures``
    failures in a row there, the server hands it back and another one runs it."""
    failures: list[int] = []

    async def broken_here(arg: JobArgument, token: StopToken, heartbeat: Heartbeat) -> None:
        failures.append(arg.fence)
        raise RuntimeError("this host lacks a library")

    await cluster.start_manager()
    await cluster.add_server("a", 2, job=broken_here)
    (job_id,) = await cluster.create(1, "move")
    await eventually(lambda: len(failures) >= 1, what="failed on a")
    await cluster.add_server("b", 2)
    await cluster.wait_running([job_id])
    assert [copy.server for copy in cluster.ledger.running(job_id)] == ["b"]
    moves = FAST_SERVER.move_after_failures
    assert moves <= len(failures) <= moves + AVOID_BOUNCES * moves  # not restarted for ever on a
    record = await cluster.wait_status(job_id, JobStatus.PROCESSING)
    assert "this host lacks a library" in (record.last_error or "")


async def test_a_job_moved_away_after_failures_still_runs_where_it_is_the_only_server(
    cluster: Cluster,
) -> None:
    calls: list[float] = []

    async def flaky(arg: JobArgument, token: StopToken, heartbeat: Heartbeat) -> None:
        calls.append(time.monotonic())
        raise RuntimeError("again")

    await cluster.start_manager()
    await cluster.add_server("only", 2, job=flaky)
    await cluster.client.create_job("alone", "", max_restarts=1000, restart_window=60)
    moves = FAST_SERVER.move_after_failures
    # Moved away, bounced back a few times, then restarted here again.
    await eventually(lambda: len(calls) > 2 * moves, 15, what="restarted after the move")


def test_moving_after_failures_is_checked_and_can_be_turned_off() -> None:
    from orchestratr_core.server import ServerOptions

    assert ServerOptions().move_after_failures == 3
    assert ServerOptions(move_after_failures=0).move_after_failures == 0
    with pytest.raises(ConfigurationError, match="move_after_failures"):
        ServerOptions(move_after_failures=-1)
