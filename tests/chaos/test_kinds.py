"""Chaos with job kinds and labelled servers (real processes), on each transport:
RabbitMQ (with PostgreSQL as the storage) and PostgreSQL alone. I7 -- a job only
ever runs on a server that runs its kind and satisfies its constraints -- checked
over the ledger, with I1-I4 and I6, through kill -9, a silent partition, a
rebalance and a blackout of every server (the last three on RabbitMQ).

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
from tests.chaos.test_faults import BOUND_SILENT, BOUND_VIEW, _burst, _on

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


# -- I7 through the other faults: several kinds, labelled servers -----------------------------
#
# The fleet: two servers run both kinds, two more run feeds with region=eu. Jobs: feeds
# anywhere that runs feeds, sockets only on the first two, eu feeds only on the eu two.

EU = ("region=eu",)


async def _kinds_fleet(
    chaos: ChaosCluster, servers: tuple[str, ...] = ("a", "b", "eu1", "eu2"), jobs: int = 4
) -> dict[str, list[str]]:
    """Start ``servers`` (``eu*``: feeds with region=eu, 20 slots; others: feeds and
    sockets, 10 slots) and ``jobs`` jobs of each pool; every job running once."""
    for name in servers:
        await _add(chaos, name)
    pools = {
        "feed": await chaos.create(jobs, "feed", kind="feed"),
        "socket": await chaos.create(jobs, "socket", kind="socket"),
        "eu": await chaos.create(jobs, "eu", kind="feed", require=EU),
    }
    await chaos.wait_all_running([j for ids in pools.values() for j in ids], within=30)
    _assert_placed(chaos, pools)
    return pools


async def _add(chaos: ChaosCluster, name: str) -> None:
    """``eu*``: feeds with region=eu, 20 slots; any other name: feeds and sockets, 10."""
    if name.startswith("eu"):
        await chaos.add_server(name, 20, kinds=("feed",), labels=EU)
    else:
        await chaos.add_server(name, 10, kinds=("feed", "socket"))


def _check_all(chaos: ChaosCluster) -> None:
    """The checker over the whole ledger (I1-I4, I6, I7), and I7 named on its own."""
    report = chaos.check()
    report.assert_ok()
    assert report.misplaced == []


def _assert_placed(chaos: ChaosCluster, pools: dict[str, list[str]]) -> None:
    """The live copies of sockets and eu feeds are on servers that may run them
    (the checker's I7 judges every copy ever; this names the failure plainly)."""
    live = {c.job: c.server for c in chaos.live_copies()}
    assert not {live[j] for j in pools["socket"] if j in live} - {"a", "b", "a2", "b2"}, live
    assert all(live[j].startswith("eu") for j in pools["eu"] if j in live), live


@pytest.mark.parametrize("chaos", ["rabbitmq"], indirect=True)
async def test_silent_partition_with_kinds_and_labels_jobs_move_only_where_they_may(
    chaos: ChaosCluster,
) -> None:
    pools = await _kinds_fleet(chaos)
    ids = [j for group in pools.values() for j in group]
    eu_on = {s: len([j for j in _on(chaos, s) if j in pools["eu"]]) for s in ("eu1", "eu2")}
    victim = max(eu_on, key=lambda s: eu_on[s])  # its eu feeds may go to the other eu only
    assert eu_on[victim]
    chaos.partition(victim)
    # Created with "in" (region=eu|us): only the eu servers carry either value.
    kept, _ = await _burst(chaos, "eu-during-partition", kind="feed", require=("region=eu|us",))
    await chaos.wait_all_running(
        ids + kept, within=BOUND_SILENT, exclude=(victim,), figure="partition, kinds"
    )
    _assert_placed(chaos, {**pools, "eu": pools["eu"] + kept})
    chaos.check(final=False).assert_ok()
    healed = chaos.heal(victim)
    await chaos.wait_server_seen(victim, healed, within=BOUND_VIEW)
    await chaos.wait_cancels_final(within=BOUND_SILENT, figure="partition cancels, kinds")
    await chaos.wait_all_running(ids + kept, within=5)
    _check_all(chaos)


@pytest.mark.parametrize("chaos", ["rabbitmq"], indirect=True)
async def test_rebalance_with_kinds_and_labels_moves_jobs_only_within_their_pools(
    chaos: ChaosCluster,
) -> None:
    pools = await _kinds_fleet(chaos, servers=("a", "eu1"))
    ids = [j for group in pools.values() for j in group]
    joined = time.time()
    await _add(chaos, "b")
    await _add(chaos, "eu2")

    def moved() -> bool:
        on_b, on_eu2 = set(_on(chaos, "b")), set(_on(chaos, "eu2"))
        return bool(on_b & set(pools["socket"])) and bool(on_eu2 & set(pools["eu"]))

    deadline = time.time() + 20
    while not moved():
        assert time.time() < deadline, {s: _on(chaos, s) for s in ("a", "b", "eu1", "eu2")}
        await asyncio.sleep(0.2)
    chaos.record_figure("rebalance, kinds", time.time() - joined, 20.0, "b and eu2 took jobs")
    await chaos.wait_all_running(ids, within=5)
    _assert_placed(chaos, pools)
    copies = chaos.copies()
    assert max(sum(1 for c in copies if c.job == j) for j in ids) <= 2  # moved at most once
    _check_all(chaos)


@pytest.mark.parametrize("chaos", ["rabbitmq"], indirect=True)
async def test_blackout_of_every_server_jobs_of_each_kind_start_only_where_they_may(
    chaos: ChaosCluster,
) -> None:
    """Every server is killed (kill -9); new ones join one by one, the eu one first:
    it takes eu feeds and plain feeds, never a socket; the sockets wait for the
    socket server. (The full blackout with broker and database restarts is
    ``test_faults.py``'s slow test.)"""
    pools = await _kinds_fleet(chaos, servers=("a", "eu1"), jobs=3)
    ids = [j for group in pools.values() for j in group]
    for name in list(chaos.procs):
        chaos.kill9(name)
    over = time.time()
    await _add(chaos, "eu-again")
    await chaos.wait_all_running(pools["eu"] + pools["feed"], within=BOUND_JOIN + BOUND_REASON)
    assert not [c for c in chaos.live_copies() if c.job in pools["socket"]]
    await chaos.add_server("a2", 10, kinds=("socket",))
    await chaos.wait_all_running(ids, within=BOUND_JOIN + BOUND_REASON, exclude=("a", "eu1"))
    chaos.record_figure("blackout, kinds", time.time() - over, 30.0, "every kind running again")
    _assert_placed(chaos, pools)
    _check_all(chaos)


@pytest.mark.parametrize("chaos", ["rabbitmq"], indirect=True)
async def test_a_joining_server_takes_one_job_of_a_spread_group_its_only_server_ran_twice(
    chaos: ChaosCluster,
) -> None:
    """Spread separation with real processes: two jobs of one group on the only
    server (after its hand-backs); a server joins and one of them moves there
    (counting alone would not move it: two jobs over two equal servers), once."""
    await _add(chaos, "a")
    ids = await chaos.create(2, "tenant", kind="feed", spread="tenant-7")
    await chaos.wait_all_running(ids, within=30)
    assert sorted(_on(chaos, "a")) == sorted(ids)
    joined = time.time()
    await _add(chaos, "b")
    deadline = joined + 20
    while not (_on(chaos, "a") and _on(chaos, "b")):
        assert time.time() < deadline, {s: _on(chaos, s) for s in ("a", "b")}
        await asyncio.sleep(0.2)
    chaos.record_figure("spread apart", time.time() - joined, 20.0, "b took one of the group")
    await asyncio.sleep(3)  # later rounds move nothing more
    await chaos.wait_all_running(ids, within=5)
    assert len(_on(chaos, "a")) == len(_on(chaos, "b")) == 1
    assert len(chaos.copies()) == 3  # exactly one moved, once
    _check_all(chaos)
