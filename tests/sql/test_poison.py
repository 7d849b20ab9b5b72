"""Issue 11, section 1: one bad event must not halt the manager, on every SQL
dialect. A manager on a real database and servers on the memory broker, in one
process; every reproduction of the issue fed to it, then a job created after
them must still start and no server may be declared dead."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from orchestratr_core import JobArgument, StopToken
from orchestratr_core import protocol as p
from orchestratr_core.errors import DeadLetter
from orchestratr_core.job import MAX_FENCE, JobStatus, ServerStatus, split_fence
from orchestratr_sql import SqlStorage
from tests.support.cluster import Cluster, Ledger, eventually


@pytest.fixture
async def cluster(any_storage: SqlStorage) -> AsyncIterator[Cluster]:
    """A cluster whose manager owns a real database of each dialect and driver."""
    c = Cluster(f"poison-{uuid.uuid4().hex[:12]}", Ledger())
    c.storage = any_storage  # type: ignore[assignment]
    try:
        yield c
    finally:
        await c.close()


def _nul_raiser(ledger_job: Callable[..., object]) -> Callable[..., object]:
    """Runs like the ledger's job, except the job named ``poison``: it raises an
    error whose text holds a NUL, as a C library or a binary protocol can."""

    async def job(arg: JobArgument, token: StopToken, heartbeat: Callable[[], None]) -> None:
        if arg.name == "poison":
            raise ValueError("bad \x00 byte")
        await ledger_job(arg, token, heartbeat)  # type: ignore[misc]

    return job


async def _still_healthy(cluster: Cluster, before: list[str]) -> None:
    """A job created now starts, the earlier ones still run, no server is dead."""
    (late,) = await cluster.create(1, prefix="late")
    await cluster.wait_running([*before, late])
    await cluster.wait_status(late, JobStatus.PROCESSING)
    for server in await cluster.monitor.servers():
        assert server.status is ServerStatus.ALIVE, server


async def test_a_job_error_holding_a_nul_is_stored_escaped_and_nothing_stalls(
    cluster: Cluster,
) -> None:
    """The reproduction: ``ValueError("bad \\x00 byte")`` made PostgreSQL refuse the
    manager's write, and the failed event blocked every later one."""
    await cluster.start_manager()
    await cluster.add_server("a", 8, job=_nul_raiser(cluster.ledger.job("a")))
    ids = await cluster.create(4)
    poison = await cluster.client.create_job("poison", "")

    async def failed_twice() -> bool:
        job = await cluster.job(poison)
        return job.restarts >= 2

    await eventually(failed_twice, what="the poison job failed and was restarted")
    error = (await cluster.job(poison)).last_error
    assert error is not None and error.startswith("ValueError: bad \\x00 byte")
    await _still_healthy(cluster, ids)


async def test_hostile_events_on_the_queue_are_dead_lettered_and_nothing_stalls(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A deeply nested event, ``--max-workers 3000000000`` in a heartbeat, a fence
    of 2^63 (OverflowError on SQLite), a generation of 2^31 in a job message
    (DataError on PostgreSQL once its fence is reported)."""
    await cluster.start_manager()
    server = await cluster.add_server("a", 8)
    ids = await cluster.create(3)
    await cluster.wait_running(ids)
    caplog.set_level(logging.WARNING, logger="orchestratr")
    broker = cluster.broker
    dead_before = len(broker.dead_letters)
    events = [
        b'{"v":1,"type":"started","x":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"v":1,"type":"heartbeat","server_id":"%s","name":"a","max_workers":3000000000,'
        b'"started_at":1,"sent_at":1,"jobs":[]}' % server.id.encode(),
        b'{"v":1,"type":"started","server_id":"%s","job_id":"%s","fence":%d,"at":1}'
        % (server.id.encode(), ids[0].encode(), MAX_FENCE + 1),
        b'{"v":1,"type":"failed","server_id":"x","job_id":"y","fence":1,"error":"e",'
        b'"restarts":1,"retry_in":NaN,"at":1}',
    ]
    for payload in events:
        broker.inject_raw("events", payload)
    broker.inject_raw(
        "jobs",
        p.encode(
            p.JobMessage(job_id=ids[1], name="forged", argument="", generation=2**31, created_at=1)
        ),
    )
    await eventually(
        lambda: len(broker.dead_letters) - dead_before == len(events) + 1, what="dead letters"
    )
    await _still_healthy(cluster, ids)
    for job_id in ids:
        job = await cluster.job(job_id)
        assert split_fence(job.fence)[0] == 1, job  # no forged generation ever ran
    warnings = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(warnings) == len(events) + 1


async def test_an_event_the_storage_refuses_is_dead_lettered_naming_job_and_server(
    cluster: Cluster,
) -> None:
    """Events that bypass the codec (a third-party transport, an older protocol
    version): the storage's DataRejected makes the manager raise DeadLetter at
    once, with the job and server named, and the next event is applied."""
    manager = await cluster.start_manager()
    ids = await cluster.create(1)
    bad: list[p.Event] = [
        p.JobStarted(server_id="srv-1", job_id=ids[0], fence=MAX_FENCE + 1, at=1.0),
        p.JobFailed(
            server_id="srv-1",
            job_id=ids[0],
            fence=1,
            error="e",
            restarts=2**31,
            retry_in=1.0,
            at=1.0,
        ),
        p.ServerHeartbeat(
            server_id="srv-2", name="n", max_workers=3_000_000_000, started_at=1.0, sent_at=1.0
        ),
    ]
    for event in bad:
        with pytest.raises(DeadLetter) as info:
            await manager._on_event(event)
        text = str(info.value)
        assert event.server_id in text and event.TYPE in text
        if isinstance(event, p.JobStarted | p.JobFailed):
            assert ids[0] in text
    good = p.JobStarted(server_id="srv-1", job_id=ids[0], fence=1 << 32, at=1.0)
    await manager._on_event(good)
    job = await cluster.job(ids[0])
    assert (job.status, job.server_id, job.fence) == (JobStatus.PROCESSING, "srv-1", 1 << 32)
    assert await cluster.storage.get_server("srv-2") is None
