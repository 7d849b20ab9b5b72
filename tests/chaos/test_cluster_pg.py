"""Faults of a grown-up deployment's database side, against real processes: a
PostgreSQL primary/standby pair that fails over (``.ci/infra postgres-ha``), and
three managers on one storage whose leader is killed or cut off from the
database. The ledger and the checker judge I1-I4 as in ``test_faults.py``; the
bounds are the ones promised in ``docs/reliability.md`` ("PostgreSQL failover",
"Several managers"), and every figure is recorded (``record_figure``).

``make chaos-cluster`` runs every test marked ``cluster`` (these, and the
RabbitMQ cluster's); the quick ones also run in the default suite.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestratr_core.job import JobStatus
from tests.chaos.harness import ChaosCluster, Proc, Timings
from tests.support.pgha import PostgresHA

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgresql, pytest.mark.cluster]

BOUND_KILL = 3.0
BOUND_VIEW = 5.0  # heartbeat 0.5 s + server timeout 3 s + margin
BOUND_CANCEL = Timings().cancel_bound
BOUND_FAILOVER_VIEW = 15.0
"""From the promotion to a converged view: the manager's event and sweep retries
(backoff up to ``retry_max``) find the new primary, then one heartbeat."""
LEASE = 3.0
"""``--leader-lease`` of the three managers; their sweep is every 1 s."""
BOUND_TAKEOVER = LEASE + 1.0 + 3.0
"""The lease, one sweep, and a margin for a loaded 2-core machine."""


@pytest.fixture
async def chaos_ha(tmp_path: Path, postgres_ha: PostgresHA) -> AsyncIterator[ChaosCluster]:
    """A chaos cluster whose storage is the primary/standby pair."""
    cluster = ChaosCluster(tmp_path, Timings(), database=postgres_ha.url)
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.close()


async def _servers_with_jobs(chaos: ChaosCluster, jobs: int = 12) -> list[str]:
    # Room for every job of a burst besides these (none waits for capacity).
    for name in ("s1", "s2", "s3"):
        await chaos.add_server(name, 40)
    ids = await chaos.create(jobs)
    await chaos.wait_all_running(ids, within=30)
    await chaos.wait_rebalance_quiet(within=30)  # no cap in force at the faults that follow
    return ids


def _busiest(chaos: ChaosCluster) -> str:
    live = [c.server for c in chaos.live_copies()]
    return max(("s1", "s2", "s3"), key=live.count)


async def _burst_during(
    chaos: ChaosCluster, prefix: str, n: int = 12, *, until: asyncio.Event | None = None
) -> tuple[list[str], list[str]]:
    """Creates, and a cancel of every other one, as an application would make them
    (retrying ``BackendUnavailable``): (jobs to keep, jobs cancelled). ``until``:
    go on in rounds of ``n`` until it is set."""
    kept: list[str] = []
    cancelled: list[str] = []
    round_ = 0
    while True:
        round_ += 1
        created = await chaos.create(n, prefix=f"{prefix}-{round_}")
        for job_id in created[::2]:
            await chaos.cancel(job_id)
        kept += created[1::2]
        cancelled += created[::2]
        if until is None or until.is_set():
            return kept, cancelled


# -- PostgreSQL failover ----------------------------------------------------------------------


async def _failover_during_burst(chaos: ChaosCluster, postgres_ha: PostgresHA) -> None:
    ids = await _servers_with_jobs(chaos)
    done = asyncio.Event()
    burst = asyncio.create_task(_burst_during(chaos, "burst", 6, until=done))
    await asyncio.sleep(0.5)
    _, promoted = await postgres_ha.failover()
    await asyncio.sleep(1.0)
    done.set()
    kept, cancelled = await burst
    # Jobs never needed the database; the new jobs and the cancels did.
    await chaos.wait_all_running(ids + kept, within=BOUND_FAILOVER_VIEW)
    await chaos.wait_cancels_final(
        within=BOUND_FAILOVER_VIEW, figure="pg failover burst: cancels final"
    )
    await chaos.wait_view_converges(
        ids + kept, within=BOUND_FAILOVER_VIEW, figure="pg failover burst: view"
    )
    chaos.record_figure(
        "pg failover burst: view after promotion",
        time.time() - promoted,
        BOUND_FAILOVER_VIEW + 15,
        "converged",
    )
    # The records say so too -- on a second look at most: the leader's rebalancing
    # may be moving a job at this instant (pending for a moment, then processing).
    deadline = time.time() + BOUND_FAILOVER_VIEW
    while True:
        records = {j.id: j for j in await chaos.jobs()}
        assert all(records[j].status is JobStatus.DELETED for j in cancelled)
        moving = [j for j in ids + kept if records[j].status is not JobStatus.PROCESSING]
        if not moving:
            break
        assert time.time() < deadline, [records[j].to_dict() for j in moving[:3]]
        await asyncio.sleep(0.2)
    # A create whose outbox row outlived the client's lease (the failover) is sent
    # again by the relay under a new generation: its two copies may overlap for a
    # moment, never under one token (docs/reliability.md, "PostgreSQL failover").
    chaos.check().assert_ok(duplicate_grace=chaos.timings.duplicate_grace)


@pytest.mark.slow
async def test_postgres_failover_during_creates_and_cancels_loses_nothing(
    chaos_ha: ChaosCluster, postgres_ha: PostgresHA
) -> None:
    """A burst of creates and cancels while the primary is killed and the standby
    promoted: every acknowledged create runs exactly once, every acknowledged
    cancel is final, and the manager's view converges on the new primary."""
    await _failover_during_burst(chaos_ha, postgres_ha)


@pytest.mark.slow
async def test_postgres_failover_during_steady_running_then_a_server_dies(
    chaos_ha: ChaosCluster, postgres_ha: PostgresHA
) -> None:
    """Steady running through a failover: no job stops or doubles; the manager
    writes to the new primary -- a server killed after it is detected dead and its
    jobs move within the usual bounds, new jobs start; then the old primary
    rejoins as the standby and a second failover (back) is as uneventful."""
    chaos = chaos_ha
    ids = await _servers_with_jobs(chaos)
    for round_ in (1, 2):
        asked, promoted = await postgres_ha.failover()
        chaos.record_figure(f"pg failover {round_}: promotion", promoted - asked, 10.0, "promoted")
        await asyncio.sleep(1.0)
        chaos.check(final=False).assert_ok()
        more = await chaos.create(3, prefix=f"after-{round_}")
        chaos.record_figure(
            f"pg failover {round_}: first create", time.time() - promoted, 30.0, "acknowledged"
        )
        ids += more
        await chaos.wait_all_running(ids, within=BOUND_FAILOVER_VIEW)
        await chaos.wait_view_converges(
            ids, within=BOUND_FAILOVER_VIEW, figure=f"pg failover {round_}: view"
        )
        await postgres_ha.rejoin()
    # The creates after each failover may leave the fleet uneven, and a rebalancing
    # round caps every server at its share for 3 s: a kill during that cap is the
    # documented gap (docs/reliability.md), not what this test is about. (A
    # make chaos-cluster run killed s2 0.1 s after a round: its jobs waited 3.15 s.)
    await chaos.wait_rebalance_quiet(within=30)
    victim = _busiest(chaos)
    chaos.kill9(victim)
    await chaos.wait_all_running(
        ids, within=BOUND_KILL, exclude=(victim,), figure="pg failover: kill -9 after"
    )
    await chaos.wait_view_converges(ids, within=BOUND_VIEW, figure="pg failover: kill -9 view")
    await chaos.wait_server_status(victim, "dead", within=BOUND_VIEW)
    chaos.check().assert_ok()


@pytest.mark.slow
@pytest.mark.parametrize("run", range(3))
async def test_postgres_failover_during_creates_and_cancels_repeated(
    chaos_ha: ChaosCluster, postgres_ha: PostgresHA, run: int
) -> None:
    """The burst failover again (median and worst for docs/reliability.md)."""
    await _failover_during_burst(chaos_ha, postgres_ha)


# -- several managers -------------------------------------------------------------------------


def _leader_lines(proc: Proc) -> list[str]:
    """Log lines only a leader writes (its duties)."""
    text = proc.log.read_text(errors="replace")
    pattern = re.compile(r"is dead: its jobs are pending|outbox relay sent|rebalance: moving")
    return [line for line in text.splitlines() if pattern.search(line)]


async def _leader(
    chaos: ChaosCluster, within: float = 20.0, *, other_than: Proc | None = None
) -> Proc:
    """The live manager holding the leader lease (not ``other_than``), from the storage."""
    assert chaos.storage is not None
    deadline = time.time() + within
    while True:
        holder = await _lease_holder(chaos)
        for proc in chaos.managers:
            if (
                holder is not None
                and proc is not other_than
                and proc.alive
                and f"manager started id={holder}" in (proc.log.read_text(errors="replace"))
            ):
                return proc
        if time.time() > deadline:
            raise AssertionError(f"no live manager holds the lease (holder {holder})")
        await asyncio.sleep(0.2)


async def _takeover(chaos: ChaosCluster, old: Proc, since: float, figure: str) -> Proc:
    """Wait for another live manager to hold the lease; record the seconds since ``since``."""
    new = await _leader(chaos, within=BOUND_TAKEOVER + 5.0, other_than=old)
    chaos.record_figure(figure, time.time() - since, BOUND_TAKEOVER, "another manager leads")
    return new


async def _lease_holder(chaos: ChaosCluster) -> str | None:
    return await chaos.lease_holder()


async def _three_managers(chaos: ChaosCluster, *, db_proxy: bool = False) -> list[Proc]:
    """Three managers with the short lease, instead of the harness's one. The
    first is started alone and becomes the leader and the events queue's active
    consumer (the first to join), so that a fault on it hits both roles."""
    assert chaos.manager is not None
    chaos.kill_manager(chaos.manager)  # the harness's own has the default lease
    first = await chaos.start_manager(leader_lease=LEASE, db_proxy=db_proxy)
    await asyncio.sleep(LEASE + 1.0)  # the harness's killed one's lease runs out
    assert await _leader(chaos) is first
    return [
        first,
        *[await chaos.start_manager(leader_lease=LEASE, db_proxy=db_proxy) for _ in range(2)],
    ]


async def _leader_kill(chaos: ChaosCluster) -> None:
    await _three_managers(chaos)
    ids = await _servers_with_jobs(chaos)
    leader = await _leader(chaos)
    killed = chaos.kill_manager(leader)
    takeover = asyncio.create_task(
        _takeover(chaos, leader, killed, "leader kill -9: lease taken over")
    )
    # The duties: a server dies and must be detected by the next leader...
    victim = _busiest(chaos)
    chaos.kill9(victim)
    await chaos.wait_all_running(ids, within=BOUND_KILL, exclude=(victim,))
    await chaos.wait_server_status(victim, "dead", within=BOUND_TAKEOVER + 3.0)
    detected = time.time()
    chaos.record_figure(
        "leader kill -9: dead server detected", detected - killed, BOUND_TAKEOVER + 3.0
    )
    new = await takeover
    assert new is not leader
    # ... and a create whose publish the relay must send (cancelled before it ran).
    more = await chaos.create(4, prefix="after-leader")
    await chaos.cancel(more[0])
    await chaos.wait_all_running(ids + more[1:], within=BOUND_KILL, exclude=(victim,))
    await chaos.wait_cancels_final(within=BOUND_CANCEL, deleted_within=BOUND_TAKEOVER)
    await chaos.wait_view_converges(
        ids + more[1:], within=BOUND_VIEW, figure="leader kill -9: view"
    )
    chaos.check().assert_ok()


async def test_kill_9_the_leading_manager_another_takes_its_duties_over(
    chaos: ChaosCluster,
) -> None:
    """Three managers; the leader is killed and a server dies right after: another
    manager takes the lease within lease + sweep and declares the server dead, and
    jobs created and cancelled afterwards are handled."""
    await _leader_kill(chaos)


@pytest.mark.slow
@pytest.mark.parametrize("run", range(3))
async def test_kill_9_the_leading_manager_repeated(chaos: ChaosCluster, run: int) -> None:
    """The leader kill again (median and worst for docs/reliability.md)."""
    await _leader_kill(chaos)


@pytest.mark.slow
@pytest.mark.parametrize("run", range(3))
async def test_a_manager_cut_off_from_the_database_does_not_act_on_stale_state(
    chaos: ChaosCluster, run: int
) -> None:
    """Three managers, each reaching PostgreSQL through its own silent proxy; the
    leader's goes silent (a partition: no connection closes). The others take the
    lease within the bound and detect a server killed meanwhile; the cut-off one
    performs no leader duty while cut off (no relay, no rebalance, no dead-server
    verdict), and when it heals it follows, and the invariants hold throughout."""
    managers = await _three_managers(chaos, db_proxy=True)
    ids = await _servers_with_jobs(chaos)
    leader = await _leader(chaos)
    assert leader is managers[0]
    duties_before = len(_leader_lines(leader))
    cut = chaos.partition_manager(leader)
    takeover = asyncio.create_task(
        _takeover(chaos, leader, cut, "partitioned leader: lease taken over")
    )
    victim = _busiest(chaos)
    chaos.kill9(victim)
    await chaos.wait_all_running(ids, within=BOUND_KILL, exclude=(victim,))
    await chaos.wait_server_status(victim, "dead", within=BOUND_TAKEOVER + 3.0)
    chaos.record_figure(
        "partitioned leader: dead server detected by another",
        time.time() - cut,
        BOUND_TAKEOVER + 3.0,
    )
    new = await takeover
    assert new is not leader
    kept, cancelled = await _burst_during(chaos, "while-cut-off", 6)
    await chaos.wait_all_running(ids + kept, within=BOUND_VIEW, exclude=(victim,))
    await chaos.wait_cancels_final(within=BOUND_CANCEL, deleted_within=BOUND_TAKEOVER)
    await chaos.wait_view_converges(ids + kept, within=BOUND_VIEW, figure="partitioned leader view")
    chaos.check(final=False).assert_ok()
    acted = _leader_lines(leader)[duties_before:]
    assert not acted, f"the cut-off manager acted as leader: {acted}"
    chaos.heal_manager(leader)
    await asyncio.sleep(LEASE + 2.0)
    assert await _leader(chaos) is new, "the healed manager took the lease back"
    more = await chaos.create(3, prefix="healed")
    await chaos.wait_all_running(ids + kept + more, within=BOUND_VIEW, exclude=(victim,))
    await chaos.wait_view_converges(ids + kept + more, within=BOUND_VIEW)
    assert all(m.alive for m in managers)
    chaos.check().assert_ok()
    assert cancelled
