"""Chaos with job kinds and labelled servers (real processes), on each transport:
RabbitMQ (with PostgreSQL as the storage) and PostgreSQL alone. I7 -- a job only
ever runs on a server that runs its kind and satisfies its constraints -- checked
over the ledger, with I1-I4 and I6.

Two servers run different kinds, a third carries a label; kill -9 of the only
server of a kind leaves its jobs pending with a reason, and they start within
the bound once a server of that kind joins."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestratr_core.job import JobStatus
from tests.chaos.harness import ChaosCluster, Timings

pytestmark = [pytest.mark.postgresql]

BOUND_REASON = 6.0  # server timeout 3 s + a sweep + margin
BOUND_JOIN = 5.0  # a server that joins: connect, read the pool registry, consume


@pytest.fixture(
    params=[
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
        pytest.param("postgresql", id="postgresql-alone"),
    ]
)
async def chaos(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ChaosCluster]:
    """A started cluster on the parameter's transport, closed (and cleaned up) after."""
    cluster = ChaosCluster(tmp_path, Timings(), transport=request.param)
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.close()


async def test_kill_9_of_the_only_server_of_a_kind_its_jobs_wait_with_a_reason_then_start(
    chaos: ChaosCluster,
) -> None:
    await chaos.add_server("feeds", 10, kinds=("feed",))
    await chaos.add_server("sockets", 10, kinds=("socket",))
    await chaos.add_server("eu", 10, kinds=("feed",), labels=("region=eu",))
    feeds = await chaos.create(4, "feed", kind="feed")
    sockets = await chaos.create(4, "socket", kind="socket")
    eu = await chaos.create(3, "eu", kind="feed", require=("region=eu",))
    everything = feeds + sockets + eu
    await chaos.wait_all_running(everything, within=30)
    assert {c.server for c in chaos.live_copies() if c.job in eu} == {"eu"}
    assert {c.server for c in chaos.live_copies() if c.job in sockets} == {"sockets"}
    chaos.check(final=False).assert_ok()

    killed = chaos.kill9("sockets")
    assert chaos.monitor is not None
    deadline = killed + BOUND_REASON
    while True:
        jobs = {j.id: j for j in await chaos.jobs()}
        if all(
            jobs[j].status is JobStatus.PENDING
            and jobs[j].pending_reason == "waiting: no live server runs kind 'socket'"
            for j in sockets
        ):
            break
        assert time.time() < deadline, [jobs[j].to_dict() for j in sockets]
        await asyncio.sleep(0.2)
    chaos.record_figure("kind gone: reason", time.time() - killed, BOUND_REASON, "pending")
    await asyncio.sleep(1.0)  # nobody else may take them meanwhile
    assert not [c for c in chaos.copies() if c.job in sockets and c.start > killed]
    # The other kinds never noticed.
    await chaos.wait_all_running(feeds + eu, within=5)

    joined = time.time()
    await chaos.add_server("sockets-2", 10, kinds=("socket",))
    await chaos.wait_server_seen("sockets-2", joined, within=30)
    await chaos.wait_all_running(
        sockets, within=BOUND_JOIN, exclude=("sockets",), figure="kind joins"
    )
    await chaos.wait_all_running(everything, within=5, exclude=("sockets",))
    report = chaos.check()
    report.assert_ok()
    assert report.misplaced == []


async def test_full_servers_of_several_kinds_never_exceed_capacity_across_pools(
    chaos: ChaosCluster,
) -> None:
    """Two servers of two kinds, one labelled, exactly full (each consumes two or
    three pools: its capacity is shared across them); kill -9 of the labelled one:
    its labelled jobs wait (the other cannot run them, and it is full), then a third
    server joins and takes what waits. I6 and I7 over the ledger."""
    await chaos.add_server("a", 4, kinds=("feed", "socket"), labels=("region=eu",))
    await chaos.add_server("b", 4, kinds=("feed", "socket"))
    eu = await chaos.create(2, "eu", kind="feed", require=("region=eu",))
    await chaos.wait_all_running(eu, within=30)
    feeds = await chaos.create(3, "feed", kind="feed")
    sockets = await chaos.create(3, "socket", kind="socket")
    everything = eu + feeds + sockets
    await chaos.wait_all_running(everything, within=30)
    assert {c.server for c in chaos.live_copies() if c.job in eu} == {"a"}
    chaos.check(final=False).assert_ok()
    await asyncio.sleep(1.0)  # every start in the ledger (a copy logs its start as it runs)

    killed = chaos.kill9("a")
    await asyncio.sleep(BOUND_REASON)  # a's jobs are pending by now; b stays full
    # The labelled jobs wait for a labelled server (b may hand its own jobs over to
    # a's, the manager's choice; never above its capacity: I6 below).
    assert not [c for c in chaos.copies() if c.job in eu and c.start > killed]
    report = chaos.check(final=False)
    report.assert_ok()
    assert report.over_capacity == []

    joined = time.time()
    await chaos.add_server("c", 4, kinds=("feed", "socket"), labels=("region=eu",))
    await chaos.wait_server_seen("c", joined, within=30)
    await chaos.wait_all_running(everything, within=BOUND_JOIN + 5, exclude=("a",))
    report = chaos.check()
    report.assert_ok()
    assert report.misplaced == [] and report.over_capacity == []
