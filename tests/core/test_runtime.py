# Over 600 lines: the runtimes' behaviour, section by section, sharing this file's wait helpers.
"""The server and manager runtimes on the memory backends: behaviour, the
original's defects, and invariants I1-I6 under the memory broker's faults."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from orchestratr_core import (
    ConfigurationError,
    DuplicateJobName,
    InvalidJobInput,
    JobArgument,
    JobStatus,
    OrchestratedServer,
    ServerManager,
    ServerOptions,
    StopToken,
    UnknownJob,
)
from orchestratr_core import protocol as p
from orchestratr_core.client import job_message
from orchestratr_core.errors import DeadLetter, PublishError
from orchestratr_core.job import (
    JobQuery,
    ServerQuery,
    ServerRecord,
    ServerStatus,
    new_id,
    split_fence,
    utcnow,
)
from orchestratr_core.server import beats as server_beats
from orchestratr_core.transport import Delivery, Subscription
from orchestratr_memory import storage as memory_storage
from orchestratr_memory.transport import MemoryTransport
from tests.support.cluster import FAST_MANAGER, FAST_SERVER, Cluster, Ledger, eventually

# The documented bounds (one heartbeat) plus 0.1 s for a loaded test machine:
# a duplicate's lower token stops (docs/reliability.md), a restarted manager's view
# is right (docs/architecture.md, I4).
DUPLICATE_BOUND = FAST_SERVER.heartbeat_interval + 0.1
RECONCILE_BOUND = FAST_SERVER.heartbeat_interval + 0.1

# -- the happy path ----------------------------------------------------------------------


async def test_created_job_starts_on_exactly_one_server_and_the_monitor_shows_it(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    for name in ("a", "b", "c"):
        await cluster.add_server(name, 5)
    (job_id,) = await cluster.create(1)
    await cluster.wait_running([job_id])
    record = await cluster.wait_status(job_id, JobStatus.PROCESSING)
    copy = cluster.ledger.running(job_id)[0]
    assert record.server_id == cluster.servers[copy.server].id
    assert record.fence == copy.fence
    assert split_fence(record.fence) == (1, 0)
    servers = await cluster.monitor.servers()
    assert sorted(s.name for s in servers) == ["a", "b", "c"]
    holder = next(s for s in servers if s.name == copy.server)
    assert [j.id for j in holder.running] == [job_id]


async def test_jobs_spread_over_servers_and_no_server_exceeds_max_workers(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 3)
    await cluster.add_server("b", 3)
    ids = await cluster.create(8)
    await eventually(lambda: len(cluster.ledger.running()) == 6, what="6 running")
    await asyncio.sleep(0.3)
    per_server: dict[str, int] = {}
    for c in cluster.ledger.running():
        per_server[c.server] = per_server.get(c.server, 0) + 1
    assert per_server == {"a": 3, "b": 3}  # I6
    pending = await cluster.monitor.all_jobs(JobQuery(statuses=frozenset({JobStatus.PENDING})))
    assert len(pending) == 2
    await cluster.add_server("c", 3)
    await cluster.wait_running(ids)


async def test_max_workers_zero_or_negative_is_a_clear_error_not_unlimited(
    cluster: Cluster,
) -> None:
    for bad in (0, -1, 1.5, True, 3_000_000_000, 2**31):
        with pytest.raises(ConfigurationError, match="max_workers"):
            OrchestratedServer(
                cluster.ledger.job("x"),
                transport=cluster.transport(),
                max_workers=bad,  # type: ignore[arg-type]
            )
    OrchestratedServer(
        cluster.ledger.job("x"), transport=cluster.transport(), max_workers=2**31 - 1
    )


@pytest.mark.parametrize(
    ("name", "says"),
    [("", "non-empty"), ("n" * 256, "255"), ("bad\x00name", "control"), ("a\nb", "control")],
)
async def test_a_server_name_no_storage_could_keep_is_a_clear_error(
    cluster: Cluster, name: str, says: str
) -> None:
    with pytest.raises(ConfigurationError, match=says):
        OrchestratedServer(cluster.ledger.job("x"), transport=cluster.transport(), name=name)


async def test_heartbeat_from_the_job_reaches_the_monitor_batched(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The storage refreshes an unchanged job's last_heartbeat only every
    # HEARTBEAT_REFRESH_STEP (30 s), and a server reports a watchdog job's own beat
    # again only every BEAT_REPORT_STEP (the same); here both do it every time.
    monkeypatch.setattr(memory_storage, "_REFRESH_STEP", timedelta(0))
    monkeypatch.setattr(server_beats, "BEAT_REPORT_STEP", 0.0)
    go = asyncio.Event()
    beats: list[tuple[float, float]] = []  # wall clock just before and after heartbeat()

    async def beats_after_go(arg: JobArgument, token: StopToken, heartbeat: Any) -> None:
        await go.wait()
        while True:
            before = time.time()
            heartbeat()
            beats.append((before, time.time()))
            if await token.sleep(0.05):
                return

    await cluster.start_manager()
    await cluster.add_server("a", 2, job=beats_after_go)
    # A job's own beat is reported where its watchdog uses it (heartbeat_timeout).
    job_id = await cluster.client.create_job("watched", heartbeat_timeout=60.0)
    started = await cluster.wait_status(job_id, JobStatus.PROCESSING)
    assert started.last_heartbeat is not None  # the start sets it, before any job beat
    go.set()
    record = await eventually(
        lambda: _shows_a_job_beat(cluster, job_id, beats), what="a heartbeat() call visible"
    )
    assert record.last_heartbeat > started.last_heartbeat


async def _shows_a_job_beat(cluster: Cluster, job_id: str, beats: list[tuple[float, float]]) -> Any:
    """The job's record if its last_heartbeat is the time of one of the job's own
    heartbeat() calls (a server heartbeat without one reports the server's time)."""
    record = await cluster.job(job_id)
    if record.last_heartbeat is None:
        return None
    stamp = record.last_heartbeat.timestamp()
    eps = 2e-6  # stored to the microsecond
    return record if any(a - eps <= stamp <= b + eps for a, b in beats) else None


async def test_blocking_job_functions_run_in_threads_off_the_event_loop(
    cluster: Cluster,
) -> None:
    seen: list[str] = []

    def blocking(arg: JobArgument, token: StopToken, heartbeat: Any) -> None:
        seen.append(threading.current_thread().name)
        while not token.wait_sync(0.05):
            heartbeat()

    await cluster.start_manager()
    await cluster.add_server("a", 4, job=blocking)
    ids = await cluster.create(4)
    await eventually(lambda: len(seen) == 4, what="4 threads started")
    assert all(name.startswith("orchestratr-job") for name in seen)
    # the loop stays responsive while four threads block
    t0 = time.monotonic()
    await asyncio.sleep(0.01)
    assert time.monotonic() - t0 < 0.5
    await cluster.client.mark_on_deleting(ids[0])
    await cluster.wait_status(ids[0], JobStatus.DELETED)


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "empty"),
        ("   ", "blank"),
        ("x" * 201, "200"),
        ("bad\x00name", "control character"),
        ("tab\there", "control character"),
        (" lead", "white space"),
    ],
)
async def test_bad_job_names_are_refused_and_nothing_is_stored(
    cluster: Cluster, name: str, message: str
) -> None:
    await cluster.start_manager()
    with pytest.raises(InvalidJobInput, match=message):
        await cluster.client.create_job(name, "")
    assert await cluster.monitor.all_jobs() == []


async def test_oversized_argument_and_duplicate_name_and_unknown_id_are_clear_errors(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    with pytest.raises(InvalidJobInput, match="bytes"):
        await cluster.client.create_job("big", "x" * (64 * 1024 + 1))
    await cluster.client.create_job("one", "")
    with pytest.raises(DuplicateJobName, match="one"):
        await cluster.client.create_job("one", "")
    with pytest.raises(UnknownJob):
        await cluster.client.mark_on_deleting("no-such-id")
    with pytest.raises(UnknownJob):
        await cluster.monitor.job("no-such-id")
    assert len(await cluster.monitor.all_jobs()) == 1


async def test_malformed_and_newer_protocol_messages_are_dead_lettered_and_servers_keep_running(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 2)
    broker = cluster.broker
    for queue in ("jobs", "events", "commands"):
        broker.inject_raw(queue, b"not json")
        broker.inject_raw(queue, b'{"v": 99, "type": "job"}')
        broker.inject_raw(queue, b'{"hello": "foreign"}')
    (job_id,) = await cluster.create(1)
    await cluster.wait_running([job_id])
    await eventually(lambda: len(broker.dead_letters) >= 7, what="dead letters")


# -- cancellation (defect 2, I3) ------------------------------------------------------------


async def test_cancelling_a_running_job_stops_it_and_it_never_runs_again(cluster: Cluster) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 2)
    await cluster.add_server("b", 2)
    (job_id,) = await cluster.create(1)
    await cluster.wait_running([job_id])
    await cluster.client.mark_on_deleting(job_id)
    await cluster.wait_status(job_id, JobStatus.DELETED)
    assert cluster.ledger.running(job_id) == []
    # kill the server that ran it; the job must not come back anywhere
    server = cluster.ledger.of(job_id)[0].server
    await cluster.servers[server].kill()
    await cluster.add_server("c", 2)
    await asyncio.sleep(1.0)
    assert len(cluster.ledger.of(job_id)) == 1
    # the name can be used again once deleted
    await cluster.client.create_job(cluster.ledger.of(job_id)[0].name, "")


async def test_a_cancel_retried_after_its_commit_lost_its_acknowledgement_is_still_broadcast(
    cluster: Cluster,
) -> None:
    """A database failover can apply a cancel and lose the reply: the retry then
    finds the job deleting already and changes nothing. The cancel must reach the
    servers' set now all the same, not wait for the manager's relay."""
    await cluster.start_manager()
    (job_id,) = await cluster.create(1)  # no server: it waits in the queue
    now = utcnow()
    # The first attempt, applied with its reply lost, by this very client (its
    # outbox row is claimed for a minute: the manager's relay will not send it).
    await cluster.storage.request_cancel(
        job_id, now, cluster.client._holder, now + timedelta(seconds=60)
    )
    assert job_id not in cluster.broker.cancellations
    record = await cluster.client.mark_on_deleting(job_id)
    assert record.status is JobStatus.DELETING
    assert job_id in cluster.broker.cancellations


async def test_cancelling_a_queued_job_means_it_never_starts(cluster: Cluster) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 1)
    first, queued = await cluster.create(2)
    await cluster.wait_running([first])
    record = await cluster.client.mark_on_deleting(queued)
    assert record.status is JobStatus.DELETING
    await cluster.client.mark_on_deleting(first)
    await cluster.wait_status(first, JobStatus.DELETED)
    # the queued message is delivered now, and dropped instead of run
    await cluster.wait_status(queued, JobStatus.DELETED)
    assert cluster.ledger.of(queued) == []


async def test_cancelling_a_job_that_never_started_does_not_crash_and_a_new_server_drops_it(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    (job_id,) = await cluster.create(1)  # no server at all
    record = await cluster.client.mark_on_deleting(job_id)
    assert record.status is JobStatus.DELETING
    again = await cluster.client.mark_on_deleting(job_id)  # idempotent
    assert again.status is JobStatus.DELETING
    await cluster.add_server("late", 2)  # joins after the cancel: reads the set first
    await cluster.wait_status(job_id, JobStatus.DELETED)
    assert cluster.ledger.of(job_id) == []


async def test_a_cancel_survives_a_manager_restart_mid_cancel(cluster: Cluster) -> None:
    manager = await cluster.start_manager()
    await cluster.add_server("a", 1)
    first, queued = await cluster.create(2)
    await cluster.wait_running([first])
    # the cancel is committed but the manager dies before broadcasting it
    now = utcnow()
    await cluster.storage.request_cancel(queued, now, "dead-manager", now)
    await manager.stop()
    cluster.manager = None
    await cluster.start_manager()  # relays the outbox row
    await cluster.client.mark_on_deleting(first)
    await cluster.wait_status(queued, JobStatus.DELETED)
    assert cluster.ledger.of(queued) == []


# -- failures, completion, stop tokens (defect 8) ---------------------------------------------


async def test_a_job_that_raises_is_restarted_with_backoff_and_its_error_is_recorded(
    cluster: Cluster,
) -> None:
    starts: list[float] = []

    async def flaky(arg: JobArgument, token: StopToken, heartbeat: Any) -> None:
        starts.append(time.monotonic())
        if len(starts) <= 4:
            raise RuntimeError(f"boom {len(starts)}")
        await token

    await cluster.start_manager()
    await cluster.add_server(
        "a",
        1,
        job=flaky,
        # In place only: moving after failures in a row is tested in test_lifecycle.
        options=ServerOptions(
            heartbeat_interval=0.2, restart_initial=0.1, restart_max=1.0, move_after_failures=0
        ),
    )
    (job_id,) = await cluster.create(1)
    await eventually(lambda: len(starts) >= 5, what="5 starts")
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.05  # never at once
    assert gaps[3] > gaps[0]  # grows
    record = await eventually(lambda: _restarted(cluster, job_id, 4), what="restarts recorded")
    assert record.last_error is not None and "boom 4" in record.last_error
    assert record.status is JobStatus.PROCESSING


async def _restarted(cluster: Cluster, job_id: str, n: int) -> Any:
    record = await cluster.job(job_id)
    return record if record.restarts >= n else None


async def test_a_job_that_returns_is_completed_and_never_runs_again(cluster: Cluster) -> None:
    runs: list[str] = []

    async def once(arg: JobArgument, token: StopToken, heartbeat: Any) -> None:
        runs.append(arg.job_id)

    await cluster.start_manager()
    await cluster.add_server("a", 2, job=once)
    (job_id,) = await cluster.create(1)
    await cluster.wait_status(job_id, JobStatus.COMPLETED)
    # a redelivery after a lost ack would be dropped: it is in the never-again set
    await eventually(lambda: job_id in cluster.broker.cancellations, what="in the set")
    await asyncio.sleep(0.5)
    assert runs == [job_id]
    # completed is final: cancelling changes nothing
    record = await cluster.client.mark_on_deleting(job_id)
    assert record.status is JobStatus.COMPLETED


async def test_a_job_ignoring_its_token_is_cancelled_hard_after_the_grace_and_reported(
    cluster: Cluster,
) -> None:
    cancelled_hard: list[bool] = []

    async def stubborn(arg: JobArgument, token: StopToken, heartbeat: Any) -> None:
        try:
            await asyncio.Event().wait()  # never looks at its token
        except asyncio.CancelledError:
            cancelled_hard.append(True)
            raise

    await cluster.start_manager()
    await cluster.add_server(
        "a", 1, job=stubborn, options=ServerOptions(heartbeat_interval=0.2, stop_grace=0.3)
    )
    (job_id,) = await cluster.create(1)
    await cluster.wait_status(job_id, JobStatus.PROCESSING)
    t0 = time.monotonic()
    await cluster.client.mark_on_deleting(job_id)
    record = await cluster.wait_status(job_id, JobStatus.DELETED)
    assert cancelled_hard == [True]
    assert time.monotonic() - t0 >= 0.3
    assert record.reason is not None and "forced" in record.reason


async def test_watchdog_restarts_a_job_that_stops_calling_heartbeat(cluster: Cluster) -> None:
    starts: list[float] = []

    async def hangs(arg: JobArgument, token: StopToken, heartbeat: Any) -> None:
        starts.append(time.monotonic())
        await token  # never calls heartbeat()

    await cluster.start_manager()
    server = await cluster.add_server("a", 1, job=hangs)
    job_id = await cluster.client.create_job("w1", heartbeat_timeout=0.3)
    assert (await cluster.job(job_id)).heartbeat_timeout == 0.3
    await eventually(lambda: len(starts) >= 2, what="restarted by the watchdog")
    assert job_id in server.running()
    failed = await eventually(lambda: _restarted(cluster, job_id, 1), what="watchdog recorded")
    assert failed.last_error is not None and "watchdog" in failed.last_error


# -- server faults on the memory broker: I1, I2 ---------------------------------------------


async def test_kill_a_server_and_its_jobs_run_again_elsewhere_once_each(cluster: Cluster) -> None:
    await cluster.start_manager()
    for name in ("a", "b", "c"):
        await cluster.add_server(name, 10)
    ids = await cluster.create(15)
    await cluster.wait_running(ids)
    victim = "a"
    moved = [c.job_id for c in cluster.ledger.running() if c.server == victim]
    await cluster.servers[victim].kill()
    t0 = time.monotonic()
    await cluster.wait_running(ids)
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0
    assert cluster.ledger.overlaps() == []
    assert cluster.ledger.fences_grow()
    for job_id in moved:
        await eventually(
            functools.partial(_owner_is_not, cluster, job_id, cluster.servers[victim].id),
            what="monitor shows the move",
        )
    # the manager finds the dead server
    servers = await eventually(
        lambda: _dead(cluster, cluster.servers[victim].id), what="server marked dead"
    )
    assert servers


async def _owner_is_not(cluster: Cluster, job_id: str, server_id: str) -> bool:
    record = await cluster.job(job_id)
    return record.status is JobStatus.PROCESSING and record.server_id not in (None, server_id)


async def _dead(cluster: Cluster, server_id: str) -> bool:
    servers = await cluster.monitor.servers(ServerQuery(statuses=None))
    return any(s.id == server_id and s.status is ServerStatus.DEAD for s in servers)


async def test_graceful_stop_hands_jobs_over_with_no_overlap(cluster: Cluster) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 10)
    await cluster.add_server("b", 10)
    ids = await cluster.create(10)
    await cluster.wait_running(ids)
    assert any(c.server == "a" for c in cluster.ledger.running())
    await cluster.servers["a"].stop()
    await cluster.wait_running(ids, timeout=5)
    assert all(c.server == "b" for c in cluster.ledger.running())
    assert cluster.ledger.overlaps() == []

    async def left() -> bool:
        servers = await cluster.monitor.servers(ServerQuery(statuses=None))
        return {s.name: s.status for s in servers}["a"] is ServerStatus.LEFT

    # Its goodbye follows the hand-over: the others' starts may be applied first.
    await eventually(left, 2.0, what="a shown as left")


async def test_partitioned_server_fences_itself_before_the_broker_gives_its_jobs_away(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    a = await cluster.add_server("a", 10, fence_timeout=0.4, broker_timeout=1.0)
    await cluster.add_server("b", 10)
    ids = await cluster.create(6)
    await cluster.wait_running(ids)
    on_a = [c.job_id for c in cluster.ledger.running() if c.server == "a"]
    assert on_a
    a.transport.partition()  # type: ignore[attr-defined]
    await eventually(
        lambda: not any(c.server == "a" for c in cluster.ledger.running()), what="a fenced"
    )
    await cluster.wait_running(ids, timeout=5)
    assert all(c.server == "b" for c in cluster.ledger.running())
    assert cluster.ledger.overlaps() == []
    assert cluster.ledger.fences_grow()

    async def status_of_a() -> ServerRecord:
        servers: list[ServerRecord] = await cluster.monitor.servers(ServerQuery(statuses=None))
        return next(s for s in servers if s.name == "a")

    await eventually(
        lambda: _is(status_of_a(), ServerStatus.DEAD), what="a dead in the manager's view"
    )
    healed = time.time()
    a.transport.heal()  # type: ignore[attr-defined]
    await asyncio.sleep(0.5)
    assert cluster.ledger.overlaps() == []
    # Back after its fence: it heartbeats again and the manager sees it alive.
    back = await eventually(
        lambda: _is(status_of_a(), ServerStatus.ALIVE, since=healed), what="a heartbeats again"
    )
    assert back.last_seen.timestamp() >= healed


async def _is(
    record: Awaitable[ServerRecord], status: ServerStatus, since: float = 0.0
) -> ServerRecord | None:
    found = await record
    return found if found.status is status and found.last_seen.timestamp() >= since else None


async def test_consumer_timeout_expiry_never_yields_two_copies(cluster: Cluster) -> None:
    await cluster.start_manager()
    a = await cluster.add_server("a", 10)
    ids = await cluster.create(3)
    await cluster.wait_running(ids)
    a.transport.expire_consumer_timeout()  # type: ignore[attr-defined]
    await asyncio.sleep(0.2)
    await cluster.wait_running(ids)
    assert cluster.ledger.overlaps() == []
    assert cluster.ledger.fences_grow()
    assert all(len(cluster.ledger.of(j)) == 2 for j in ids)


async def test_broker_restart_every_job_runs_again_once(cluster: Cluster) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 10)
    await cluster.add_server("b", 10)
    ids = await cluster.create(10)
    await cluster.wait_running(ids)
    cluster.broker.broker_restart()
    await asyncio.sleep(0.3)
    await cluster.wait_running(ids, timeout=15)
    assert cluster.ledger.overlaps() == []
    assert cluster.ledger.fences_grow()


async def test_duplicate_job_message_never_runs_two_copies_for_long(cluster: Cluster) -> None:
    """A publish retried after a lost confirm makes two messages of one job: the
    manager tells the lower fence to stop and drop its copy."""
    await cluster.start_manager()
    await cluster.add_server("a", 5)
    await cluster.add_server("b", 5)
    (job_id,) = await cluster.create(1)
    await cluster.wait_running([job_id])
    record = await cluster.job(job_id)
    from orchestratr_core.client import job_message

    await cluster.manager.transport.publish_job(job_message(record, 1))  # type: ignore[union-attr]
    await eventually(lambda: len(cluster.ledger.of(job_id)) == 2, what="duplicate delivered")
    await eventually(
        lambda: len(cluster.ledger.running(job_id)) == 1, timeout=DUPLICATE_BOUND, what="one left"
    )
    await asyncio.sleep(0.5)
    assert len(cluster.ledger.running(job_id)) == 1
    ((_, _, overlap),) = cluster.ledger.overlaps()
    assert overlap <= DUPLICATE_BOUND, f"two copies for {overlap:.3f} s"


# -- manager faults and reconciliation (defects 3, 4, 5) --------------------------------------


async def test_manager_restart_reconciles_the_view_within_a_heartbeat(cluster: Cluster) -> None:
    manager = await cluster.start_manager()
    await cluster.add_server("a", 10)
    ids = await cluster.create(5)
    await cluster.wait_running(ids)
    await manager.stop()
    # while the manager is away: a job moves and a new job cannot be created,
    # but running jobs keep running
    await cluster.servers["a"].kill()
    await cluster.add_server("b", 10)
    await cluster.wait_running(ids)
    cluster.manager = None
    restarted = time.monotonic()
    await cluster.start_manager()
    b_id = cluster.servers["b"].id

    async def reconciled() -> bool:
        return all([await _owned_by(cluster, job_id, b_id) for job_id in ids])

    await eventually(reconciled, timeout=RECONCILE_BOUND, what="reconciled")
    assert time.monotonic() - restarted <= RECONCILE_BOUND


async def _owned_by(cluster: Cluster, job_id: str, server_id: str) -> bool:
    record = await cluster.job(job_id)
    return record.status is JobStatus.PROCESSING and record.server_id == server_id


async def test_job_created_while_broker_unreachable_is_sent_by_the_outbox_relay(
    cluster: Cluster,
) -> None:
    """No message before commit and no committed job without a message."""
    await cluster.start_manager()
    await cluster.add_server("a", 5)
    from orchestratr_core.client import OrchestratorClient

    offline = OrchestratorClient(cluster.storage, None)  # commit only: no transport
    job_id = await offline.create_job("from-outbox", "x")
    record = await cluster.job(job_id)
    assert record.status is JobStatus.PENDING
    await cluster.wait_running([job_id])


async def test_a_job_is_processing_only_after_its_server_reported_the_start(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    (job_id,) = await cluster.create(1)
    await asyncio.sleep(0.3)
    assert (await cluster.job(job_id)).status is JobStatus.PENDING
    await cluster.add_server("a", 1)
    await cluster.wait_status(job_id, JobStatus.PROCESSING)


async def test_a_late_started_report_never_revives_a_deleted_job(cluster: Cluster) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 2)
    (job_id,) = await cluster.create(1)
    await cluster.wait_running([job_id])
    await cluster.client.mark_on_deleting(job_id)
    deleted = await cluster.wait_status(job_id, JobStatus.DELETED)
    transport = cluster.transport()
    await transport.connect()
    try:
        await transport.publish_event(
            p.JobStarted(server_id="ghost", job_id=job_id, fence=deleted.fence + 10, at=time.time())
        )
        # The manager applies events one at a time, in order: once a heartbeat
        # published after the report is applied, the report was applied too.
        marker = new_id()
        now = time.time()
        await transport.publish_event(
            p.ServerHeartbeat(
                server_id=marker, name="marker", max_workers=1, started_at=now, sent_at=now
            )
        )
        await eventually(functools.partial(_has_server, cluster, marker), what="marker applied")
    finally:
        await transport.close()
    assert (await cluster.job(job_id)).status is JobStatus.DELETED


async def _has_server(cluster: Cluster, server_id: str) -> bool:
    return any(s.id == server_id for s in await cluster.monitor.servers(ServerQuery(statuses=None)))


async def test_two_managers_on_one_storage_are_safe(cluster: Cluster, ledger: Ledger) -> None:
    # Short outbox leases: a row that a manager sent but failed to clear would be
    # sent again by the leader's relay within the wait below.
    options = dataclasses.replace(FAST_MANAGER, outbox_lease=0.3)
    first = await cluster.start_manager(options)
    second = ServerManager(storage=cluster.storage, transport=cluster.transport(), options=options)
    await second.start()
    # A server drops a second message of a job it runs under an equal token, so
    # the messages are counted in the broker, by a consumer that holds them all.
    raw = cluster.transport()
    await raw.connect()
    try:
        seen: list[str] = []

        async def hold(delivery: Delivery) -> None:
            seen.append(delivery.message.job_id)

        await raw.consume_jobs(1000, hold)
        ids = [await first.client.create_job(f"m1-{i}") for i in range(3)]
        ids += [await second.client.create_job(f"m2-{i}") for i in range(3)]
        with pytest.raises(DuplicateJobName):
            await second.client.create_job("m1-0")
        await asyncio.sleep(1.0)  # three outbox leases: every relay had its chance
        await eventually(lambda: len(seen) == cluster.broker.held("jobs"), what="all counted")
        assert cluster.broker.depth("jobs") == 0
        assert sorted(seen) == sorted(ids)  # no double publish: one message per job
        await raw.close()  # the held messages go back to the queue
        await cluster.add_server("a", 10)
        await cluster.wait_running(ids)
        await asyncio.sleep(0.5)
        assert all(len(ledger.of(j)) == 1 for j in ids)
        assert (cluster.broker.depth("jobs"), cluster.broker.held("jobs")) == (0, len(ids))
        assert first.is_leader != second.is_leader
    finally:
        await raw.close()
        await second.stop()


async def test_new_server_joining_gets_queued_jobs(cluster: Cluster) -> None:
    await cluster.start_manager()
    await cluster.add_server("a", 2)
    ids = await cluster.create(4)
    await eventually(lambda: len(cluster.ledger.running()) == 2, what="two running")
    await cluster.add_server("b", 2)
    await cluster.wait_running(ids)


# -- rebalancing (defect 9) ------------------------------------------------------------------


async def test_servers_that_join_receive_their_share_and_each_job_moves_at_most_once(
    cluster: Cluster,
) -> None:
    options = dataclasses.replace(FAST_MANAGER, rebalance_interval=0.5, rebalance_max_share=1.0)
    await cluster.start_manager(options)
    await cluster.add_server("a", 12)
    ids = await cluster.create(12)
    await cluster.wait_running(ids)
    await cluster.add_server("b", 12)
    await cluster.add_server("c", 6)  # half the capacity: half the share

    def spread() -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in cluster.ledger.running():
            counts[c.server] = counts.get(c.server, 0) + 1
        return counts

    await eventually(
        lambda: spread().get("a", 0) <= 6 and spread().get("c", 0) >= 2 and len(spread()) == 3,
        timeout=10,
        what="balanced",
    )
    await cluster.wait_running(ids)
    await asyncio.sleep(1.5)  # further rounds change nothing once balanced
    final = spread()
    shares = {"a": 12 * 12 / 30, "b": 12 * 12 / 30, "c": 12 * 6 / 30}
    assert all(abs(final[s] - shares[s]) <= 1 for s in shares), final
    assert cluster.ledger.overlaps() == []
    assert max(len(cluster.ledger.of(j)) for j in ids) <= 2  # nobody moved twice
    assert sum(final.values()) == 12


# -- outbox and reports (defects 3 and 4) ----------------------------------------------------


async def test_no_message_is_sent_when_the_create_is_not_committed(cluster: Cluster) -> None:
    await cluster.start_manager()
    await cluster.client.create_job("only-once")
    assert cluster.broker.depth("jobs") == 1
    with pytest.raises(DuplicateJobName):
        await cluster.client.create_job("only-once")
    with pytest.raises(InvalidJobInput):
        await cluster.client.create_job("")
    await asyncio.sleep(0.3)  # the relay has nothing to send either
    assert cluster.broker.depth("jobs") == 1


class FlakyReports(MemoryTransport):
    """A real memory transport whose first few start reports fail to publish."""

    def __init__(self, url: str, failures: int) -> None:
        super().__init__(url)
        self.failures = failures

    async def publish_event(self, event: p.Event) -> None:
        if isinstance(event, p.JobStarted) and self.failures > 0:
            self.failures -= 1
            raise PublishError("broker did not confirm")
        await super().publish_event(event)


async def test_a_lost_start_report_neither_drops_the_job_nor_hides_it_for_long(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    flaky = FlakyReports(cluster.url, failures=50)
    server = OrchestratedServer(
        cluster.ledger.job("a"), transport=flaky, name="a", max_workers=2, options=FAST_SERVER
    )
    await server.start()
    cluster.servers["a"] = server
    (job_id,) = await cluster.create(1)
    await cluster.wait_running([job_id])
    # the start report never arrives, but the next heartbeat tells the manager
    await cluster.wait_status(job_id, JobStatus.PROCESSING, timeout=3)
    assert cluster.broker.held("jobs") == 1  # the message is still held, not dropped
    assert len(cluster.ledger.of(job_id)) == 1


async def test_a_frozen_server_stops_its_jobs_before_they_write_again(cluster: Cluster) -> None:
    """SIGSTOP, a GC pause or a suspended VM: when the process runs again, its
    jobs see their lease expired before they take one more step."""
    await cluster.start_manager()
    a = await cluster.add_server("a", 10, fence_timeout=0.3, broker_timeout=1.0)
    await cluster.add_server("b", 10)
    ids = await cluster.create(6)
    await cluster.wait_running(ids)
    assert any(c.server == "a" for c in cluster.ledger.running())
    a.transport.partition()  # type: ignore[attr-defined]
    time.sleep(0.6)  # the whole process freezes past its fence timeout  # noqa: ASYNC251
    thawed = time.monotonic()
    await eventually(lambda: not any(c.server == "a" for c in cluster.ledger.running()))
    late = [w for c in cluster.ledger.copies if c.server == "a" for w in c.writes if w[0] >= thawed]
    assert late == []
    await cluster.wait_running(ids)
    assert cluster.ledger.overlaps() == []


async def test_rebalancing_never_moves_jobs_toward_a_server_that_went_quiet(
    cluster: Cluster,
) -> None:
    options = dataclasses.replace(FAST_MANAGER, rebalance=False, rebalance_fresh=0.5)
    manager = await cluster.start_manager(options)
    await cluster.add_server("a", 10)
    ids = await cluster.create(8)
    await cluster.wait_running(ids)
    b = await cluster.add_server("b", 10)
    await eventually(lambda: _count_servers(cluster, 2), what="b registered")
    b.transport.partition()  # type: ignore[attr-defined]
    await asyncio.sleep(0.7)  # quiet for longer than rebalance_fresh, not yet dead
    assert await manager.rebalance() == 0
    b.transport.heal()  # type: ignore[attr-defined]
    moved = await eventually(manager.rebalance, timeout=3, what="rebalance once b is back")
    assert moved == 2  # a quarter of the 8 running jobs per round


async def test_no_rebalancing_round_right_after_a_server_lost_its_jobs_without_a_release(
    cluster: Cluster,
) -> None:
    """A server killed a moment ago is not yet declared dead; the broker gave its
    jobs to the others. A round then would see it as an empty live server, move
    jobs off the survivors toward it and cap them at their share: the moved jobs
    would wait for the caps to end (a chaos run saw a job wait 3 s past the kill
    -9 bound). No round while such a server is not heard from; rounds resume
    once it is declared dead."""
    options = dataclasses.replace(FAST_MANAGER, rebalance=False, server_timeout=3.0)
    manager = await cluster.start_manager(options)
    await cluster.add_server("a", 20)
    ids = await cluster.create(12)
    await cluster.wait_running(ids)
    await cluster.add_server("b", 20)
    await cluster.add_server("c", 20)
    await eventually(lambda: _count_servers(cluster, 3), what="b and c registered")
    await cluster.servers["a"].kill()  # its 12 jobs go to b and c at once
    await cluster.wait_running(ids)
    await eventually(lambda: _owned_by_names(cluster, ids, {"b", "c"}), what="the moves applied")
    # b and c hold 12 between them, a (alive in the storage) none: without the
    # rule, this round would move jobs off b or c toward a.
    assert await manager.rebalance() == 0
    await eventually(lambda: _count_servers(cluster, 2), timeout=10, what="a declared dead")
    await cluster.add_server("d", 20)
    moved = await eventually(manager.rebalance, timeout=5, what="a round toward d")
    assert moved > 0


async def _owned_by_names(cluster: Cluster, ids: list[str], names: set[str]) -> bool:
    servers = {s.id: s.name for s in await cluster.monitor.servers()}
    page = await cluster.monitor.jobs()
    return all(servers.get(j.server_id or "") in names for j in page.items if j.id in ids)


async def _count_servers(cluster: Cluster, n: int) -> bool:
    return len(await cluster.monitor.servers()) == n


# -- bursts of starts, and a loss during a stop's grace ---------------------------------------


class RecordingEvents(MemoryTransport):
    """A real memory transport that records every event it publishes (and every
    command its server receives), and can hold the events back (``gate``
    cleared) the way a slow broker would."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.published: list[p.Event] = []
        self.commands: list[p.Command] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = 0  # events waiting at the gate

    async def publish_event(self, event: p.Event) -> None:
        self.held += 1
        await self.gate.wait()
        self.held -= 1
        await super().publish_event(event)
        self.published.append(event)

    async def consume_commands(
        self, server_id: str, handler: Callable[[p.Command], Awaitable[None]]
    ) -> tuple[Subscription, frozenset[str]]:
        async def record(command: p.Command) -> None:
            self.commands.append(command)
            await handler(command)

        return await super().consume_commands(server_id, record)


async def _add_recorded_server(
    cluster: Cluster,
    name: str,
    max_workers: int,
    job: Any = None,
    options: ServerOptions = FAST_SERVER,
) -> tuple[OrchestratedServer, RecordingEvents]:
    transport = RecordingEvents(cluster.url)
    server = OrchestratedServer(
        job or cluster.ledger.job(name),
        transport=transport,
        name=name,
        max_workers=max_workers,
        options=options,
    )
    await server.start()
    cluster.servers[name] = server
    return server, transport


async def test_a_burst_of_starts_is_reported_by_a_heartbeat_not_one_event_per_job(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    ids = await cluster.create(500)  # queued: the server takes them all at once
    server, transport = await _add_recorded_server(cluster, "a", 500)
    await cluster.wait_running(ids, timeout=30)

    async def all_processing() -> list[Any] | None:
        query = JobQuery(statuses=frozenset({JobStatus.PROCESSING}))
        jobs = await cluster.monitor.all_jobs(query)
        return jobs if len(jobs) == 500 else None

    jobs = await eventually(all_processing, timeout=10, what="500 processing")
    fences = {c.job_id: c.fence for c in cluster.ledger.running()}
    assert {j.id: (j.server_id, j.fence) for j in jobs} == {
        job_id: (server.id, fences[job_id]) for job_id in ids
    }
    starts = [e for e in transport.published if isinstance(e, p.JobStarted)]
    # One confirmed message per start was 500; the queued ones go as a heartbeat.
    assert len(starts) < 50, f"{len(starts)} start reports for 500 starts"
    assert len(transport.published) < 100
    assert cluster.ledger.overlaps() == []


async def test_jobs_that_ended_within_a_burst_keep_their_start_reports(cluster: Cluster) -> None:
    """A burst of starts is replaced by a heartbeat of the jobs running *now*.
    Jobs that already ended are not in it: their start reports stay, ahead of
    their stop reports, so the manager sees every job start, then stop, as
    without the heartbeat (a release, guarded by the owner, would otherwise not
    apply while the dead server still owns the job in the storage)."""
    await cluster.start_manager()
    a = await cluster.add_server("a", 20)
    ids = await cluster.create(20)
    await cluster.wait_running(ids)
    for job_id in ids:
        await cluster.wait_status(job_id, JobStatus.PROCESSING)

    async def done_at_once(arg: JobArgument, token: StopToken, heartbeat: Any) -> None:
        return None  # the work was over: completed

    b, transport = await _add_recorded_server(
        cluster, "b", 20, job=cluster.ledger.job("b", body=done_at_once)
    )
    await eventually(lambda: transport.published, what="b heartbeats")
    transport.gate.clear()  # b's events queue up behind a slow broker
    await eventually(lambda: transport.held, what="b's event pump waits for the broker")
    await a.kill()  # its 20 jobs go to b at once, and complete there
    await eventually(
        lambda: len([c for c in cluster.ledger.copies if c.server == "b"]) == 20 and not b._runs,
        what="20 jobs ran and ended on b",
    )
    transport.gate.set()
    for job_id in ids:
        await cluster.wait_status(job_id, JobStatus.COMPLETED, timeout=5)
    burst = [e for e in transport.published if isinstance(e, p.JobStarted | p.JobStopped)]
    for job_id in ids:
        kinds = [type(e) for e in burst if e.job_id == job_id]
        assert kinds == [p.JobStarted, p.JobStopped], kinds


async def _hold_events(transport: RecordingEvents) -> None:
    """Let the server's events queue up: its pump waits at the gate with a heartbeat
    built before anything that follows."""
    await eventually(lambda: transport.published, what="the first heartbeat")
    transport.gate.clear()
    await eventually(lambda: transport.held, what="the event pump waits for the broker")


def _burst_started(transport: RecordingEvents) -> set[str]:
    """The ids of the start reports that heartbeats replaced."""
    return {
        job_id
        for e in transport.published
        if isinstance(e, p.ServerHeartbeat)
        for job_id in e.started
    }


def _start_reports(transport: RecordingEvents) -> set[str]:
    return {e.job_id for e in transport.published if isinstance(e, p.JobStarted)}


async def test_a_job_the_storage_does_not_know_is_stopped_also_when_it_started_in_a_burst(
    cluster: Cluster,
) -> None:
    """A foreign message (a job this storage never had) must not run. Its start
    report is among those a heartbeat replaces, and the storage leaves unknown ids
    out of a heartbeat: the heartbeat names it in ``started``, so the manager
    tells the server to stop it and drop its message, as on a ``JobStarted``."""
    await cluster.start_manager()
    server, transport = await _add_recorded_server(cluster, "a", 20)
    await _hold_events(transport)
    ids = await cluster.create(10)
    foreign = p.JobMessage(
        job_id=new_id(), name="foreign", argument="x", generation=1, created_at=time.time()
    )
    other = cluster.transport()
    await other.connect()
    try:
        await other.publish_job(foreign)
    finally:
        await other.close()
    await eventually(lambda: len(cluster.ledger.running()) == 11, what="11 copies on a")
    transport.gate.set()
    await eventually(
        lambda: not cluster.ledger.running(foreign.job_id), timeout=3, what="foreign job stopped"
    )
    # Its start was reported by the burst's heartbeat, not by a JobStarted.
    assert foreign.job_id in _burst_started(transport)
    assert foreign.job_id not in _start_reports(transport)
    for job_id in ids:
        record = await cluster.wait_status(job_id, JobStatus.PROCESSING)
        assert record.server_id == server.id
    await asyncio.sleep(0.5)
    assert len(cluster.ledger.of(foreign.job_id)) == 1  # dropped: never run again
    assert sorted(c.job_id for c in cluster.ledger.running()) == sorted(ids)
    # Its message was acknowledged for good: only the ten jobs' messages are left.
    assert (cluster.broker.depth("jobs"), cluster.broker.held("jobs")) == (0, 10)


async def test_a_job_that_moved_in_a_burst_is_stopped_on_its_previous_owner_at_once(
    cluster: Cluster,
) -> None:
    """A newer copy of a job starts on ``b`` while ``a`` still runs the older one
    (here: a message republished under a newer generation). ``b`` starts ten at
    once, so a heartbeat replaces its start reports; the manager tells ``a`` to
    stop its stale copies at once, as on a ``JobStarted``, not when ``a``
    heartbeats next (30 s here)."""
    await cluster.start_manager(
        dataclasses.replace(FAST_MANAGER, server_timeout=60.0, rebalance=False)
    )
    a, a_transport = await _add_recorded_server(
        cluster, "a", 10, options=dataclasses.replace(FAST_SERVER, heartbeat_interval=30.0)
    )
    ids = await cluster.create(10)
    await cluster.wait_running(ids)
    records = {job_id: await cluster.wait_status(job_id, JobStatus.PROCESSING) for job_id in ids}
    assert {r.server_id for r in records.values()} == {a.id}
    b, b_transport = await _add_recorded_server(cluster, "b", 10)
    await _hold_events(b_transport)
    assert cluster.manager is not None
    for record in records.values():  # a is full: b takes them
        await cluster.manager.transport.publish_job(job_message(record, record.generation + 1))
    await eventually(
        lambda: len([c for c in cluster.ledger.running() if c.server == "b"]) == 10,
        what="b runs the newer copies",
    )
    b_transport.gate.set()
    await eventually(
        lambda: not [c for c in cluster.ledger.running() if c.server == "a"],
        timeout=3,
        what="a's stale copies stopped",
    )
    assert _burst_started(b_transport) == set(ids)
    assert not _start_reports(b_transport) & set(ids)
    stops = {
        (c.job_id, c.reason, c.drop, c.max_fence)
        for c in a_transport.commands
        if isinstance(c, p.StopJob)
    }
    assert stops == {
        (job_id, p.StopReason.SUPERSEDED, True, record.fence) for job_id, record in records.items()
    }
    for job_id in ids:
        await eventually(
            functools.partial(_owned_by, cluster, job_id, b.id), timeout=3, what="owned by b"
        )
    assert [c.server for c in cluster.ledger.running()] == ["b"] * 10
    assert cluster.ledger.fences_grow()


async def test_a_delivery_lost_during_the_stop_grace_ends_the_grace_at_once(
    cluster: Cluster,
) -> None:
    """A job asked to hand itself back ignores its token, so its grace runs. If
    the delivery is lost meanwhile, the broker may give the message to another
    server: the copy must stop at once, not at the end of the grace."""

    async def stubborn(arg: JobArgument, token: StopToken, heartbeat: Any) -> None:
        await asyncio.Event().wait()  # never looks at its token

    await cluster.start_manager()
    slow_grace = dataclasses.replace(FAST_SERVER, stop_grace=10.0)
    a = await cluster.add_server(
        "a",
        2,
        job=cluster.ledger.job("a", body=stubborn),
        options=slow_grace,
        fence_timeout=0.4,
        broker_timeout=1.2,
    )
    (job_id,) = await cluster.create(1)
    await cluster.wait_running([job_id])
    await cluster.add_server("b", 2)
    assert cluster.manager is not None
    await cluster.manager.transport.send_command(p.ReleaseJobs(count=1, hold=0, hold_for=30), a.id)
    await eventually(lambda: job_id not in a.running(), what="release requested")
    await asyncio.sleep(0.2)
    assert [c.server for c in cluster.ledger.running(job_id)] == ["a"]  # in its grace
    a.transport.partition()  # type: ignore[attr-defined]
    cut = time.monotonic()
    await eventually(lambda: not cluster.ledger.running(job_id), timeout=5, what="a's copy ended")
    assert time.monotonic() - cut < 1.0  # at the fence timeout (0.4 s), not after 10 s
    await cluster.wait_running([job_id], timeout=5)
    assert [c.server for c in cluster.ledger.running(job_id)] == ["b"]
    assert cluster.ledger.overlaps() == []
    a.transport.heal()  # type: ignore[attr-defined]


async def test_an_event_failing_with_an_unclassified_error_is_tried_three_times_then_dead_lettered(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug or a driver error no storage classifies must not halt the manager either."""
    manager = await cluster.start_manager()
    (job_id,) = await cluster.create(1)
    # An id that is no string makes the memory storage raise TypeError (unhashable).
    broken = p.JobStarted(server_id="s1", job_id=["x"], fence=1, at=1.0)  # type: ignore[arg-type]
    with pytest.raises(DeadLetter, match=r"failed 3 times: TypeError"):
        await manager._on_event(broken)
    assert [r.getMessage() for r in caplog.records if "failed 3 times" in r.getMessage()] == [
        "started event of server s1 failed 3 times"
    ]
    await manager._on_event(p.JobStarted(server_id="s1", job_id=job_id, fence=1 << 32, at=1.0))
    assert (await cluster.job(job_id)).server_id == "s1"
