"""The server half of an update in place (issue 15, "Live update"): a job function
marked ``@updatable`` takes a new argument from an ``UpdateJob`` command without
a restart, and the server reports it (``JobUpdated``); any other copy is left as
it is. Real servers on the memory broker; the test plays the manager's part
(publishes the job, reads the events, sends the command)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from orchestratr_core import JobArgument, JobStatus, StopToken
from orchestratr_core import protocol as p
from orchestratr_core.errors import MalformedMessage
from orchestratr_core.job import (
    MAX_GENERATION,
    MAX_JOB_ID_LENGTH,
    JobRecord,
    ServerStatus,
    make_fence,
    new_id,
    split_fence,
)
from orchestratr_core.lifecycle import drop_mark, is_updatable, parse_drop, parse_hold, updatable
from orchestratr_core.runner import Heartbeat, UpdatableHeartbeat
from orchestratr_memory.broker import MemoryBroker
from orchestratr_memory.transport import MemoryTransport
from tests.support.cluster import FAST_MANAGER, FAST_SERVER, Cluster, eventually
from tests.support.inplace import Fleet, Seen, drop_mark_scenario, opted_in


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    name = f"u-{uuid.uuid4().hex[:12]}"
    f = Fleet(lambda: MemoryTransport(f"memory://{name}"))
    await f.start()
    try:
        yield f
    finally:
        await f.close()
        MemoryBroker.reset(name)


def not_opted_in(seen: Seen) -> object:
    async def job(arg: JobArgument, token: StopToken, heartbeat: Heartbeat) -> None:
        seen.calls.append(arg.argument)
        await token.wait()

    return job


def test_the_command_the_event_and_the_heartbeat_field_round_trip() -> None:
    command = p.UpdateJob(job_id="j", fence=make_fence(3, 1), argument_version=7, argument="ü x")
    event = p.JobUpdated(server_id="s", job_id="j", fence=1, argument_version=7, at=5.0)
    beat = p.ServerHeartbeat(
        server_id="s",
        name="n",
        max_workers=1,
        started_at=1.0,
        sent_at=2.0,
        kinds=("a", "b"),
        updatable=("b",),
        drops=True,
    )
    assert json.loads(p.encode(beat))["drops"] is True
    for message in (command, event, beat):
        assert p.decode(p.encode(message)) == message
    # A heartbeat without updatable kinds is written as before (older readers).
    plain = p.ServerHeartbeat(server_id="s", name="n", max_workers=1, started_at=1, sent_at=2)
    assert b"updatable" not in p.encode(plain) and b"drops" not in p.encode(plain)
    assert p.decode_as(p.encode(plain), p.ServerHeartbeat).updatable == ()
    assert not p.decode_as(p.encode(plain), p.ServerHeartbeat).drops


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"argument": "a\u0000b"}, "NUL"),
        ({"argument": 5}, "must be str"),
        ({"argument_version": -1}, "argument_version"),
        ({"fence": "1"}, "must be int"),
    ],
)
def test_a_malformed_update_is_refused_with_a_clear_reason(
    changes: dict[str, object], reason: str
) -> None:
    body = {"v": 1, "type": "update", "job_id": "j", "fence": 1, "argument_version": 1}
    body["argument"] = "x"
    raw = json.dumps({**body, **changes})
    with pytest.raises(MalformedMessage, match=reason):
        p.decode(raw)


def test_the_decorator_marks_the_function_and_nothing_else() -> None:
    async def plain(arg: JobArgument, token: StopToken, heartbeat: Heartbeat) -> None: ...

    assert not is_updatable(plain)
    assert updatable(plain) is plain and is_updatable(plain)
    assert not is_updatable(lambda: None)


async def test_an_updatable_function_takes_the_new_argument_without_a_restart(
    fleet: Fleet,
) -> None:
    server = await fleet.server(opted_in(fleet.seen))
    message = await fleet.publish("v0")
    fence = make_fence(1, 0)

    await fleet.update(server, message.job_id, 1, "v1")
    await eventually(lambda: fleet.seen.updates == ["v1"], 5, what="the update in place")
    await eventually(
        lambda: (message.job_id, fence, 1) in fleet.seen.updated(), 5, what="JobUpdated"
    )
    await fleet.update(server, message.job_id, 2, "v2")
    await eventually(lambda: fleet.seen.updates == ["v1", "v2"], 5, what="the second update")
    # One call of the function: no restart, one copy, the server still runs it.
    assert fleet.seen.calls == ["v0"]
    assert server.running()[message.job_id].argument == "v2"
    assert server.running()[message.job_id].fence == fence
    # The server announces the kinds it updates in place, and that it reads drop marks.
    await eventually(fleet.seen.heartbeats, 5, what="a heartbeat")
    assert fleet.seen.heartbeats()[-1].updatable == ("default",)
    assert fleet.seen.heartbeats()[-1].drops


async def test_an_old_or_repeated_version_is_not_applied_again_but_is_acknowledged(
    fleet: Fleet,
) -> None:
    server = await fleet.server(opted_in(fleet.seen))
    message = await fleet.publish("a0")
    await fleet.update(server, message.job_id, 3, "a3")
    await eventually(lambda: fleet.seen.updates == ["a3"], 5, what="version 3")
    await fleet.update(server, message.job_id, 2, "a2-late")  # older: overtaken
    await fleet.update(server, message.job_id, 3, "a3")  # again: the first ack was lost
    await eventually(lambda: len(fleet.seen.updated()) == 3, 5, what="every command acknowledged")
    assert {version for _, _, version in fleet.seen.updated()} == {3}
    await asyncio.sleep(3 * FAST_SERVER.heartbeat_interval)
    assert fleet.seen.updates == ["a3"]
    assert server.running()[message.job_id].argument == "a3"


async def test_a_function_that_did_not_opt_in_is_left_as_it_is(fleet: Fleet) -> None:
    server = await fleet.server(not_opted_in(fleet.seen))
    message = await fleet.publish("p0")
    await fleet.update(server, message.job_id, 1, "p1")
    await asyncio.sleep(3 * FAST_SERVER.heartbeat_interval)
    # Neither applied nor acknowledged: the manager falls back to a restart.
    assert fleet.seen.updated() == []
    assert fleet.seen.calls == ["p0"]
    assert server.running()[message.job_id].argument == "p0"
    assert all(hb.updatable == () for hb in fleet.seen.heartbeats())


async def test_an_update_for_another_fence_or_job_changes_nothing(fleet: Fleet) -> None:
    server = await fleet.server(opted_in(fleet.seen))
    message = await fleet.publish("f0")
    await fleet.update(server, message.job_id, 1, "stale", fence=make_fence(1, 5))
    await fleet.update(server, new_id(), 1, "nobody")
    await asyncio.sleep(3 * FAST_SERVER.heartbeat_interval)
    assert fleet.seen.updated() == [] and fleet.seen.updates == []
    assert server.running()[message.job_id].argument == "f0"


async def test_a_restart_after_a_failure_keeps_the_updated_argument(fleet: Fleet) -> None:
    seen = fleet.seen

    @updatable
    async def fails_on_update(
        arg: JobArgument, token: StopToken, heartbeat: UpdatableHeartbeat
    ) -> None:
        seen.calls.append(arg.argument)
        async for new in heartbeat.updates():
            seen.updates.append(new.argument)
            raise RuntimeError("cannot take it live after all")

    server = await fleet.server(fails_on_update)
    message = await fleet.publish("r0")
    await fleet.update(server, message.job_id, 1, "r1")
    # Restarted on the same server (backoff) with the argument it holds now.
    await eventually(lambda: seen.calls == ["r0", "r1"], 5, what="restarted with r1")
    assert seen.updates == ["r1"]
    assert server.running()[message.job_id].argument == "r1"


async def test_a_blocking_function_reads_the_latest_argument(fleet: Fleet) -> None:
    seen = fleet.seen
    threads: set[int] = set()

    @updatable
    def blocking(arg: JobArgument, token: StopToken, heartbeat: UpdatableHeartbeat) -> None:
        threads.add(threading.get_ident())
        seen.calls.append(arg.argument)
        last = arg.argument
        while not token.wait_sync(0.02):
            current = heartbeat.argument.argument
            if current != last:
                seen.updates.append(current)
                last = current
            heartbeat()

    server = await fleet.server(blocking)
    message = await fleet.publish("b0")
    await fleet.update(server, message.job_id, 1, "b1")
    await eventually(lambda: seen.updates == ["b1"], 5, what="the thread saw b1")
    assert threading.get_ident() not in threads
    assert seen.calls == ["b0"]


async def test_updates_end_when_the_job_is_told_to_stop(fleet: Fleet) -> None:
    ended = asyncio.Event()

    @updatable
    async def job(arg: JobArgument, token: StopToken, heartbeat: UpdatableHeartbeat) -> None:
        fleet.seen.calls.append(arg.argument)
        async for new in heartbeat.updates():
            fleet.seen.updates.append(new.argument)
        ended.set()

    server = await fleet.server(job)
    await fleet.publish("s0")
    began = time.monotonic()
    await server.stop()
    assert ended.is_set()
    assert time.monotonic() - began < FAST_SERVER.stop_grace


def test_a_drop_mark_is_read_only_as_one_and_fits_the_cancel_command() -> None:
    assert drop_mark("j", 4) == "j@4!"
    assert parse_drop("j@4!") == ("j", 4)
    assert parse_drop("j@4") is None and parse_drop("j!") is None
    assert parse_hold("j@4!") is None  # what an older server reads: not a hold
    longest = drop_mark("x" * MAX_JOB_ID_LENGTH, MAX_GENERATION)
    command = p.CancelJob(job_id=longest)
    assert p.decode(p.encode(command)) == command


async def test_a_drop_mark_drops_the_old_message_but_keeps_the_running_copy(
    fleet: Fleet,
) -> None:
    await drop_mark_scenario(fleet)


# -- the manager and storage half: OrchestratorClient.update end to end ----------------


def ledger_updatable(cluster: Cluster, server: str, updates: list[tuple[str, str]]) -> object:
    """The ledger's job function for ``server``, marked ``@updatable``: it records
    each argument it takes in place as ``(server, argument)``."""

    async def body(arg: JobArgument, token: StopToken, heartbeat: UpdatableHeartbeat) -> None:
        async for new in heartbeat.updates():
            updates.append((server, new.argument))

    return updatable(cluster.ledger.job(server, body=body))


async def _applied(cluster: Cluster, job_id: str, version: int) -> bool:
    return (await cluster.job(job_id)).argument_applied_version == version


async def test_the_client_updates_an_opted_in_job_in_place_without_a_restart(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    updates: list[tuple[str, str]] = []
    await cluster.add_server("a", 2, job=ledger_updatable(cluster, "a", updates))
    (job_id,) = await cluster.create(1, "live")
    await cluster.wait_running([job_id])
    before = await cluster.wait_status(job_id, JobStatus.PROCESSING)

    updated = await cluster.client.update(job_id, "v1")
    assert (updated.status, updated.server_id, updated.fence) == (
        JobStatus.PROCESSING,
        before.server_id,
        before.fence,
    )
    assert (updated.update_mode, updated.argument_version, updated.update_pending) == (
        "in_place",
        1,
        False,
    )
    await eventually(lambda: updates == [("a", "v1")], 5, what="taken in place")
    await eventually(lambda: _applied(cluster, job_id, 1), 5, what="the acknowledgement stored")
    await cluster.client.update(job_id, "v2")
    await eventually(lambda: _applied(cluster, job_id, 2), 5, what="the second one")
    assert updates == [("a", "v1"), ("a", "v2")]
    # One copy all along, still running the first call; no restart follows.
    await asyncio.sleep(3 * FAST_SERVER.heartbeat_interval)
    assert [(c.argument, c.end) for c in cluster.ledger.of(job_id)] == [("0", None)]
    after = await cluster.job(job_id)
    assert (after.status, after.fence, after.generation) == (
        JobStatus.PROCESSING,
        before.fence,
        before.generation,
    )
    shown = after.to_dict()
    assert (shown["update_mode"], shown["argument_applied_version"]) == ("in_place", 2)
    # Servers drop the job's older messages without stopping the copy.
    assert drop_mark(job_id, before.generation) in cluster.broker.cancellations


async def test_a_job_that_did_not_opt_in_is_still_restarted(cluster: Cluster) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 2)  # the ledger's plain job function
    (job_id,) = await cluster.create(1, "plain")
    await cluster.wait_running([job_id])
    await cluster.wait_status(job_id, JobStatus.PROCESSING)
    updated = await cluster.client.update(job_id, "new")
    assert (updated.status, updated.update_pending) == (JobStatus.PAUSING, True)
    await eventually(
        lambda: [c.argument for c in cluster.ledger.running(job_id)] == ["new"],
        FAST_SERVER.stop_grace + 10,
        what="restarted with the new argument",
    )
    assert [c.argument for c in cluster.ledger.of(job_id)] == ["0", "new"]


async def test_a_live_server_of_an_older_version_makes_the_update_a_restart(
    cluster: Cluster,
) -> None:
    """Mixed fleet: a live server that reads no drop marks (its heartbeats say
    nothing of them) could start the job's old message after its owner died, so
    the update restarts the job, although its owner would take it in place."""
    manager = await cluster.start_manager()
    updates: list[tuple[str, str]] = []
    await cluster.add_server("a", 2, job=ledger_updatable(cluster, "a", updates))
    (job_id,) = await cluster.create(1, "mixed")
    await cluster.wait_running([job_id])
    await cluster.wait_status(job_id, JobStatus.PROCESSING)
    older = p.decode_as(
        json.dumps(
            {
                "v": 1,
                "type": "heartbeat",
                "server_id": "old-1",
                "name": "old-1",
                "max_workers": 2,
                "started_at": time.time() - 60,
                "sent_at": time.time(),
                "jobs": [],
            }
        ).encode(),
        p.ServerHeartbeat,
    )
    assert not older.drops
    await manager._on_event(older)
    updated = await cluster.client.update(job_id, "new")
    assert (updated.status, updated.update_mode) == (JobStatus.PAUSING, "restart")
    await eventually(
        lambda: [c.argument for c in cluster.ledger.running(job_id)] == ["new"],
        FAST_SERVER.stop_grace + 10,
        what="restarted with the new argument",
    )
    assert updates == []
    assert [c.argument for c in cluster.ledger.of(job_id)] == ["0", "new"]


async def _updated_in_place_then_owner_killed(cluster: Cluster, name: str) -> JobRecord:
    """A job on ``a`` updated in place to ``"new"``; ``b`` joins and ``a`` is
    killed; returns once the job runs on ``b`` with ``"new"`` (the job as it was
    before the update)."""
    updates: list[tuple[str, str]] = []
    await cluster.add_server("a", 2, job=ledger_updatable(cluster, "a", updates))
    (job_id,) = await cluster.create(1, name)
    await cluster.wait_running([job_id])
    before = await cluster.wait_status(job_id, JobStatus.PROCESSING)
    await cluster.client.update(job_id, "new")
    await eventually(lambda: _applied(cluster, job_id, 1), 5, what="taken in place")
    await cluster.add_server("b", 2, job=ledger_updatable(cluster, "b", updates))
    await cluster.servers["a"].kill()

    async def moved() -> bool:
        running = cluster.ledger.running(job_id)
        return [(c.server, c.argument) for c in running] == [("b", "new")]

    await eventually(moved, 15, what="restarted on b with the new argument")
    return before


async def test_after_an_update_in_place_the_next_owner_starts_with_the_new_argument(
    cluster: Cluster,
) -> None:
    """The owner dies after taking the update in place: the broker hands its old
    message (old argument) to the other server, which drops it (the drop mark);
    the manager republishes the job under a new generation and it starts there
    with the new argument, once."""
    await cluster.start_manager()
    before = await _updated_in_place_then_owner_killed(cluster, "crash")
    job_id = before.id
    after = await cluster.wait_status(job_id, JobStatus.PROCESSING)
    assert after.generation > before.generation and after.update_mode == "restart"
    await asyncio.sleep(3 * FAST_SERVER.heartbeat_interval)
    copies = cluster.ledger.of(job_id)
    assert [(c.server, c.argument) for c in copies] == [("a", "0"), ("b", "new")]
    assert split_fence(copies[1].fence)[0] > before.generation
    assert cluster.ledger.overlaps() == []


async def test_an_update_not_acknowledged_in_time_falls_back_to_a_restart(
    cluster: Cluster,
) -> None:
    """The owner announced the kind updatable, but its ``UpdateJob`` never
    arrives (lost, here dropped on the way): after ``update_ack_timeout`` the
    leader restarts the job with the new argument."""
    manager = await cluster.start_manager(dataclasses.replace(FAST_MANAGER, update_ack_timeout=1.0))
    send = manager.transport.send_command
    dropped: list[p.Command] = []

    async def lossy(command: p.Command, server_id: str | None = None) -> None:
        if isinstance(command, p.UpdateJob):
            dropped.append(command)
            return
        await send(command, server_id)

    manager._transport.send_command = lossy  # type: ignore[method-assign]
    updates: list[tuple[str, str]] = []
    await cluster.add_server("a", 2, job=ledger_updatable(cluster, "a", updates))
    (job_id,) = await cluster.create(1, "lossy")
    await cluster.wait_running([job_id])
    await cluster.wait_status(job_id, JobStatus.PROCESSING)
    assert (await cluster.client.update(job_id, "new")).update_mode == "in_place"
    await eventually(
        lambda: [c.argument for c in cluster.ledger.running(job_id)] == ["new"],
        FAST_SERVER.stop_grace + 10,
        what="restarted with the new argument",
    )
    assert updates == []
    assert len(dropped) >= 2  # the client's, and the leader's resend before the fallback
    assert [c.argument for c in cluster.ledger.of(job_id)] == ["0", "new"]
    assert cluster.ledger.overlaps() == []
    assert (await cluster.job(job_id)).update_mode == "restart"


async def test_a_redelivered_old_message_releases_the_job_before_its_owner_is_declared_dead(
    cluster: Cluster,
) -> None:
    """The broker hands the killed owner's message to another server, which drops
    it (the drop mark): the manager takes that as the owner's loss of the message
    and republishes the job at once, not only once the owner is declared dead
    (here never within the test: a server timeout of 60 s)."""
    slow_death = dataclasses.replace(FAST_MANAGER, server_timeout=60.0)
    await cluster.start_manager(slow_death)
    job_id = (await _updated_in_place_then_owner_killed(cluster, "fast")).id
    servers = {s.name: s.status for s in await cluster.monitor.servers()}
    assert servers["a"] is ServerStatus.ALIVE  # not declared dead: the redelivery told
    assert [(c.server, c.argument) for c in cluster.ledger.of(job_id)] == [
        ("a", "0"),
        ("b", "new"),
    ]
