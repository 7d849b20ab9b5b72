"""Job kinds, server labels and placement constraints on the in-process cluster:
a job only ever runs on a server that runs its kind and satisfies its
constraints (I7), waits with a reason while none is live, and starts when one
joins; capacity holds across kinds."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from typing import Any

import pytest

from orchestratr_core import OrchestratedServer, ServerManager
from orchestratr_core.errors import ConfigurationError, InvalidJobInput
from orchestratr_core.job import JobQuery, JobStatus, ServerQuery
from orchestratr_core.placement import Pool
from tests.support.cluster import FAST_MANAGER, Cluster, eventually


async def _create(
    cluster: Cluster, name: str, kind: str = "default", require: tuple[str, ...] = ()
) -> tuple[str, Pool]:
    job_id = await cluster.client.create_job(name, name, kind=kind, require=list(require))
    return job_id, Pool.of(kind, require)


async def test_jobs_run_only_on_servers_that_run_their_kind_and_match_their_constraints(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    await cluster.add_server("feeds", kinds=("feed",))
    await cluster.add_server("sockets", kinds=("socket",))
    await cluster.add_server("eu", kinds=("feed", "socket"), labels={"region": "eu"})
    pools: dict[str, Pool] = {}
    for n in range(6):
        job_id, pool = await _create(cluster, f"f{n}", "feed")
        pools[job_id] = pool
        job_id, pool = await _create(cluster, f"s{n}", "socket")
        pools[job_id] = pool
    for n in range(3):
        job_id, pool = await _create(cluster, f"eu{n}", "socket", ("region=eu",))
        pools[job_id] = pool
    await cluster.wait_running(list(pools))
    assert cluster.ledger.misplaced(pools) == []
    eu_only = [j for j, p in pools.items() if p.constraints]
    assert {c.server for j in eu_only for c in cluster.ledger.of(j)} == {"eu"}
    assert {c.kind for c in cluster.ledger.copies} == {"feed", "socket"}
    feed = await cluster.monitor.jobs(JobQuery(kind="feed"))
    assert len(feed.items) == 6 and all(j.kind == "feed" for j in feed.items)
    assert cluster.ledger.overlaps() == []


async def test_the_jobs_of_a_kind_nobody_runs_wait_with_a_reason_and_start_when_it_joins(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    await cluster.add_server("feeds", kinds=("feed",))
    socket_id, socket_pool = await _create(cluster, "sock", "socket")
    eu_id, eu_pool = await _create(cluster, "eu-feed", "feed", ("region=eu",))
    feed_id, feed_pool = await _create(cluster, "feed", "feed")
    await cluster.wait_running([feed_id])

    async def reasons() -> bool:
        sock, eu = await cluster.job(socket_id), await cluster.job(eu_id)
        return sock.pending_reason == "waiting: no live server runs kind 'socket'" and (
            eu.pending_reason == "waiting: no live server runs kind 'feed' with region=eu"
        )

    await eventually(reasons, what="pending reasons")
    assert (await cluster.job(socket_id)).to_dict()["pending_reason"] is not None
    assert cluster.ledger.of(socket_id) == [] and cluster.ledger.of(eu_id) == []
    await cluster.add_server("sockets", kinds=("socket",))
    await cluster.add_server("eu", kinds=("feed",), labels={"region": "eu"})
    await cluster.wait_running([socket_id, eu_id])
    # The ledger shows the copy as it starts; the manager records it a moment later.
    running = await cluster.wait_status(socket_id, JobStatus.PROCESSING)
    assert running.to_dict()["pending_reason"] is None
    pools = {socket_id: socket_pool, eu_id: eu_pool, feed_id: feed_pool}
    assert cluster.ledger.misplaced(pools) == []


async def test_killing_the_only_server_of_a_kind_leaves_its_jobs_pending_until_one_joins(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    await cluster.add_server("feeds", kinds=("feed",))
    sockets = await cluster.add_server("sockets", kinds=("socket",))
    ids = {}
    for n in range(4):
        job_id, pool = await _create(cluster, f"s{n}", "socket")
        ids[job_id] = pool
    await cluster.wait_running(list(ids))
    await sockets.kill()

    async def all_waiting() -> bool:
        jobs = [await cluster.job(j) for j in ids]
        return all(
            j.status is JobStatus.PENDING
            and j.pending_reason == "waiting: no live server runs kind 'socket'"
            for j in jobs
        )

    await eventually(all_waiting, what="socket jobs pending with a reason")
    assert all(c.server == "sockets" for c in cluster.ledger.copies)  # never on "feeds"
    await cluster.add_server("sockets-2", kinds=("socket",))
    await cluster.wait_running(list(ids), timeout=5.0)
    assert cluster.ledger.misplaced(ids) == []
    assert cluster.ledger.overlaps() == []
    assert cluster.ledger.fences_grow()


async def test_capacity_holds_across_kinds_and_per_kind(cluster: Cluster) -> None:
    await cluster.start_manager()
    server = await cluster.add_server(
        "both", max_workers=5, kinds=("a", "b"), max_workers_per_kind={"a": 2}
    )
    a = [(await _create(cluster, f"a{n}", "a"))[0] for n in range(4)]
    b = [(await _create(cluster, f"b{n}", "b"))[0] for n in range(6)]
    await eventually(lambda: len(server.running()) == 5, what="five jobs running")
    await asyncio.sleep(0.5)
    running = server.running()
    assert len(running) == 5
    assert sum(1 for arg in running.values() if arg.kind == "a") <= 2
    peak = _peak(cluster)
    assert peak["all"] <= 5 and peak["a"] <= 2
    pending = await cluster.monitor.jobs(JobQuery(statuses=frozenset({JobStatus.PENDING})))
    assert len(pending.items) == 5
    assert {j.id for j in pending.items} <= set(a + b)


def _peak(cluster: Cluster) -> dict[str, int]:
    """The most copies that ran at once on one server, in all and of kind ``a``."""
    points = []
    for c in cluster.ledger.copies:
        points.append((c.start, 1, c.kind))
        if c.end is not None:
            points.append((c.end, -1, c.kind))
    points.sort(key=lambda p: (p[0], p[1]))
    now = {"all": 0, "a": 0}
    peak = dict(now)
    for _, step, kind in points:
        now["all"] += step
        if kind == "a":
            now["a"] += step
        peak = {k: max(peak[k], now[k]) for k in now}
    return peak


async def test_rebalancing_moves_jobs_only_to_servers_that_may_run_them(
    cluster: Cluster,
) -> None:
    await cluster.start_manager(
        dataclasses.replace(FAST_MANAGER, rebalance_interval=0.5, rebalance_max_share=1.0)
    )
    await cluster.add_server("a1", kinds=("a",))
    ids = {}
    for n in range(8):
        job_id, pool = await _create(cluster, f"a{n}", "a")
        ids[job_id] = pool
    await cluster.wait_running(list(ids))
    await cluster.add_server("b1", kinds=("b",))  # may not take any of them
    await cluster.add_server("a2", kinds=("a",))
    await eventually(lambda: len(cluster.servers["a2"].running()) >= 3, what="a2 took its share")
    assert cluster.servers["b1"].running() == {}
    await cluster.wait_running(list(ids))
    assert cluster.ledger.misplaced(ids) == []
    assert cluster.ledger.overlaps() == []


async def test_a_spread_group_runs_on_separate_servers_while_there_is_room(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    for name in ("x", "y", "z"):
        await cluster.add_server(name, kinds=("t",))
    ids = [
        await cluster.client.create_job(f"tenant-{n}", "", kind="t", spread="tenant")
        for n in range(3)
    ]
    await cluster.wait_running(ids)
    assert sorted(c.server for c in cluster.ledger.copies if c.end is None) == ["x", "y", "z"]


async def test_servers_record_their_kinds_and_labels(cluster: Cluster) -> None:
    await cluster.start_manager()
    await cluster.add_server("eu", kinds=("feed", "socket"), labels={"region": "eu"})
    await cluster.add_server("plain")

    async def both() -> bool:
        return len(await cluster.monitor.servers(ServerQuery())) == 2

    await eventually(both, what="two servers")
    eu = await cluster.monitor.servers(ServerQuery(label="region=eu"))
    assert [(s.name, s.kinds, s.labels) for s in eu] == [("eu", ("feed", "socket"), ("region=eu",))]
    assert eu[0].to_dict()["labels"] == {"region": "eu"}


async def test_bad_kinds_labels_and_constraints_are_refused(cluster: Cluster) -> None:
    await cluster.start_manager()
    with pytest.raises(InvalidJobInput, match="job kind"):
        await cluster.client.create_job("x", kind="no spaces")
    with pytest.raises(InvalidJobInput, match="KEY=VALUE"):
        await cluster.client.create_job("x", require=["region"])
    with pytest.raises(InvalidJobInput, match="never both hold"):
        await cluster.client.create_job("x", require=["region=eu", "region=us"])
    with pytest.raises(ConfigurationError, match="label"):
        OrchestratedServer(cluster.ledger.job("s"), transport="memory", labels=["bad"])
    with pytest.raises(ConfigurationError, match="does not run"):
        OrchestratedServer(
            {"a": cluster.ledger.job("s")}, transport="memory", max_workers_per_kind={"b": 1}
        )
    assert (await cluster.monitor.jobs(JobQuery())).items == ()


async def test_a_kill_with_four_kinds_moves_every_job_once_and_holds_capacity(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    kinds = ("k0", "k1", "k2", "k3")
    for name in ("w1", "w2", "w3", "w4"):
        await cluster.add_server(name, max_workers=30, kinds=kinds)
    pools: dict[str, Pool] = {}
    ids = await cluster.client.create_jobs([(f"j{n}", "", kinds[n % 4]) for n in range(80)])
    for n, job_id in enumerate(ids):
        pools[job_id] = Pool.of(kinds[n % 4])
    await cluster.wait_running(ids)
    victim = max(cluster.servers, key=lambda s: len(cluster.servers[s].running()))
    await cluster.servers[victim].kill()
    await cluster.wait_running(ids, timeout=10.0)
    for name, server in cluster.servers.items():
        if name != victim:
            assert len(server.running()) <= 30
    assert cluster.ledger.misplaced(pools) == []
    assert cluster.ledger.overlaps() == []


async def test_rebalancing_moves_a_spread_job_off_a_server_that_runs_two_of_its_group(
    cluster: Cluster,
) -> None:
    """The only server takes both jobs of a group (after its hand-backs); when a
    second server joins, counting alone would move nothing (2 jobs over two equal
    servers are within one of their share), yet one job of the group moves there,
    once."""
    await cluster.start_manager(_SPREAD_MANAGER)
    await cluster.add_server("x", kinds=("t",))
    ids = [
        await cluster.client.create_job(f"tenant-{n}", "", kind="t", spread="tenant")
        for n in range(2)
    ]
    await cluster.wait_running(ids)
    assert len(cluster.servers["x"].running()) == 2
    await cluster.add_server("y", kinds=("t",))

    def apart() -> bool:
        live = {c.job_id: c.server for c in cluster.ledger.copies if c.end is None}
        return all(j in live for j in ids) and live[ids[0]] != live[ids[1]]

    await eventually(apart, what="the spread group on two servers")
    await asyncio.sleep(1.0)  # later rounds move nothing more
    assert apart()
    assert max(len(cluster.ledger.of(j)) for j in ids) <= 2
    assert sum(len(cluster.ledger.of(j)) for j in ids) == 3  # exactly one moved
    assert cluster.ledger.overlaps() == []


async def test_spread_jobs_stay_together_when_no_other_server_may_take_one(
    cluster: Cluster,
) -> None:
    """No move without a target: the other server is full, or runs another kind, or
    already runs a job of the group."""
    await cluster.start_manager(_SPREAD_MANAGER)
    await cluster.add_server("x", kinds=("t",))
    await cluster.add_server("full", max_workers=1, kinds=("t",))
    await cluster.add_server("other-kind", kinds=("u",))
    filler = await cluster.client.create_job("filler", "", kind="t")
    await cluster.wait_running([filler])
    ids = [
        await cluster.client.create_job(f"tenant-{n}", "", kind="t", spread="tenant")
        for n in range(2)
    ]
    await cluster.wait_running(ids)
    await asyncio.sleep(1.5)  # several rebalancing rounds
    assert all(len(cluster.ledger.of(j)) == 1 for j in [*ids, filler])
    assert cluster.manager is not None
    assert await cluster.manager.rebalance() == 0


_SPREAD_MANAGER = dataclasses.replace(FAST_MANAGER, rebalance_interval=0.2, rebalance_hold=1.0)


async def test_a_job_with_an_in_constraint_runs_only_on_a_server_with_one_of_the_values(
    cluster: Cluster,
) -> None:
    await cluster.start_manager()
    await cluster.add_server("ap", kinds=("feed",), labels={"region": "ap"})
    job_id, pool = await _create(cluster, "eu-or-us", "feed", ("region=us|eu",))
    assert (await cluster.job(job_id)).constraints == ("region=eu|us",)

    async def waits() -> bool:
        reason = (await cluster.job(job_id)).pending_reason
        return reason == "waiting: no live server runs kind 'feed' with region=eu|us"

    await eventually(waits, what="the pending reason")
    await cluster.add_server("us", kinds=("feed",), labels={"region": "us"})
    await cluster.wait_running([job_id])
    assert [c.server for c in cluster.ledger.of(job_id)] == ["us"]
    assert cluster.ledger.misplaced({job_id: pool}) == []


async def test_the_leader_works_out_pending_reasons_at_a_pace_set_by_their_cost(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pending reasons count the pending jobs (and the running ones per server):
    a scan of the jobs table each time while a million fill. The leader waits
    nine times as long as the last round took before the next, and at least a
    sweep; its other duties keep the sweep's pace."""
    manager = ServerManager(
        storage=cluster.storage, transport=cluster.transport(), options=FAST_MANAGER
    )
    rounds: list[float] = []
    sweeps: list[float] = []
    cost = {"s": 0.0}

    async def costly() -> int:
        rounds.append(time.monotonic())
        await asyncio.sleep(cost["s"])
        return 0

    relay = manager._relay_outbox

    async def counted_relay(now: Any) -> None:
        sweeps.append(time.monotonic())
        await relay(now)

    monkeypatch.setattr(manager, "update_pending_reasons", costly)
    monkeypatch.setattr(manager, "_relay_outbox", counted_relay)
    cluster.manager = manager
    await manager.start()
    await eventually(lambda: len(rounds) >= 5, what="cheap rounds")
    assert len(rounds) >= len(sweeps) - 1  # cheap: every sweep (0.1 s)
    cost["s"] = 0.2
    began, before = time.monotonic(), len(rounds)
    await asyncio.sleep(4.0)
    costly_rounds = [t for t in rounds[before:] if t >= began]
    gaps = [b - a for a, b in itertools.pairwise(costly_rounds)]
    assert 1 <= len(costly_rounds) <= 3, costly_rounds  # 0.2 s + 9 x 0.2 s apart
    assert all(gap >= 1.9 for gap in gaps), gaps
    assert len([t for t in sweeps if t >= began]) >= 8  # the sweep kept its pace
