"""Faults against real processes, the real broker and the real database.

Each test starts a manager and ``orchestratr server`` processes (see
``harness.py``), injects one fault, and checks the invariants over the ledger the
jobs wrote themselves: I1 (one live copy; fences grow), I2 (every job runs again
within the stated bound), I3 (a cancelled job never runs again: every cancelled
job has no copy left after the bound and ends ``deleted``), I4 (the manager's
view converges), I6 (capacity). The bounds asserted here are the ones promised in
``docs/reliability.md``; every figure measured is appended to
``benchmarks/results/chaos-runs.jsonl`` (``make chaos-record``: the tracked ``chaos.json``).
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from orchestratr_core.job import JobStatus, split_fence
from tests.chaos.harness import ChaosCluster, Timings, seeded

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgresql]

# Bounds (seconds) with the harness's timings; see docs/reliability.md.
BOUND_KILL = 3.0
BOUND_SIGTERM = 4.0
BOUND_SILENT = 14.0  # broker heartbeat 3 s: it drops a silent peer after 2-3 periods
BOUND_BROKER_RESTART = 20.0
BOUND_VIEW = 5.0  # heartbeat 0.5 s + server timeout 3 s + margin
BOUND_CANCEL = Timings().cancel_bound  # stop grace 2 s + margin, on a healthy server


async def _three_servers_with_jobs(chaos: ChaosCluster, jobs: int = 12) -> list[str]:
    for name in ("s1", "s2", "s3"):
        await chaos.add_server(name, 10)
    ids = await chaos.create(jobs)
    await chaos.wait_all_running(ids, within=30)
    return ids


async def _burst(
    chaos: ChaosCluster, prefix: str, *, kind: str = "default", require: tuple[str, ...] = ()
) -> tuple[list[str], list[str]]:
    """Creates and cancels during a fault: (jobs to keep, jobs cancelled)."""
    created = await chaos.create(6, prefix=prefix, kind=kind, require=require)
    cancelled = created[::2]
    for job_id in cancelled:
        await chaos.cancel(job_id)
    return [j for j in created if j not in cancelled], cancelled


def _on(chaos: ChaosCluster, server: str) -> list[str]:
    return [c.job for c in chaos.live_copies() if c.server == server]


async def test_kill_9_a_server_its_jobs_run_again_elsewhere_once_each(chaos: ChaosCluster) -> None:
    ids = await _three_servers_with_jobs(chaos)
    victim = max(("s1", "s2", "s3"), key=lambda s: len(_on(chaos, s)))
    assert _on(chaos, victim)
    chaos.kill9(victim)
    await chaos.wait_all_running(ids, within=BOUND_KILL, exclude=(victim,), figure="kill -9")
    chaos.check().assert_ok()
    await chaos.wait_view_converges(ids, within=BOUND_VIEW, figure="kill -9 view")
    chaos.check().assert_ok()


async def test_sigterm_a_server_hands_its_jobs_over_with_no_loss(chaos: ChaosCluster) -> None:
    ids = await _three_servers_with_jobs(chaos)
    victim = max(("s1", "s2", "s3"), key=lambda s: len(_on(chaos, s)))
    signalled = chaos.sigterm(victim)
    assert await chaos.wait_exit(victim, 15) == 0
    await chaos.wait_all_running(ids, within=BOUND_SIGTERM, exclude=(victim,))
    took = time.time() - signalled
    chaos.record_figure("SIGTERM", took, BOUND_SIGTERM, "all jobs running again")
    await chaos.wait_view_converges(ids, within=BOUND_VIEW, figure="SIGTERM view")
    chaos.check().assert_ok()
    # Its goodbye is published after its jobs were handed back, so the others'
    # starts may be applied first: it shows as left within the view's bound.
    await chaos.wait_server_status(victim, "left", within=BOUND_VIEW)


async def test_sigstop_past_the_heartbeat_timeout_then_sigcont_no_two_copies(
    chaos: ChaosCluster,
) -> None:
    ids = await _three_servers_with_jobs(chaos)
    victim = max(("s1", "s2", "s3"), key=lambda s: len(_on(chaos, s)))
    chaos.sigstop(victim)
    kept, _ = await _burst(chaos, "during-stop")
    await chaos.wait_all_running(
        ids + kept, within=BOUND_SILENT, exclude=(victim,), figure="SIGSTOP"
    )
    chaos.sigcont(victim)
    await asyncio.sleep(3)  # the thawed server must stop, not write, and reconnect
    await chaos.wait_cancels_final(within=BOUND_SILENT, figure="SIGSTOP cancels")
    chaos.check().assert_ok()
    await chaos.wait_all_running(ids + kept, within=5)
    await chaos.wait_view_converges(ids, within=BOUND_VIEW, figure="SIGSTOP view")
    chaos.check().assert_ok()


async def test_silent_partition_the_server_fences_itself_before_the_broker_reassigns(
    chaos: ChaosCluster,
) -> None:
    ids = await _three_servers_with_jobs(chaos)
    victim = max(("s1", "s2", "s3"), key=lambda s: len(_on(chaos, s)))
    chaos.partition(victim)
    kept, _ = await _burst(chaos, "during-partition")
    await chaos.wait_all_running(
        ids + kept, within=BOUND_SILENT, exclude=(victim,), figure="partition"
    )
    chaos.check(final=False).assert_ok()
    healed = chaos.heal(victim)
    # Cut off past its fence, it reconnects and heartbeats again (it once never did).
    await chaos.wait_server_seen(victim, healed, within=BOUND_VIEW, figure="partition heal")
    await asyncio.sleep(3)
    await chaos.wait_cancels_final(within=BOUND_SILENT, figure="partition cancels")
    chaos.check().assert_ok()
    await chaos.wait_all_running(ids + kept, within=5)
    await chaos.wait_view_converges(ids + kept, within=BOUND_VIEW, figure="partition view")
    chaos.check().assert_ok()


async def test_broker_restart_every_job_runs_again_once(chaos: ChaosCluster) -> None:
    """Creates and cancels while the broker is down are committed and sent later
    by the outbox relay. A cancel issued while the broker is down can reach the
    servers only after it is back: a job started in that window is stopped at
    once (the manager sees the start of a deleting job) -- the one documented
    gap in I3, bounded here by ``cancel_grace``: one heartbeat plus the stated
    margin (``Timings.cancel_grace``), for cancels the client could not broadcast
    only."""
    ids = await _three_servers_with_jobs(chaos)
    restart = asyncio.create_task(chaos.restart_broker())
    await asyncio.sleep(0.5)
    kept, _ = await _burst(chaos, "while-broker-down")
    down, up = await restart
    await chaos.wait_all_running(ids, within=BOUND_BROKER_RESTART, after=down)
    took = time.time() - up
    chaos.record_figure("broker restart", took, BOUND_BROKER_RESTART, "all jobs running again")
    await chaos.wait_all_running(ids + kept, within=BOUND_BROKER_RESTART)
    await chaos.wait_cancels_final(within=BOUND_BROKER_RESTART, figure="broker restart cancels")
    await asyncio.sleep(2)
    # A create whose confirm was lost in the shutdown is relayed: a second message
    # of the job can start a lower-token copy, which the manager must stop within
    # one heartbeat (docs/reliability.md), plus the stated margin.
    grace = chaos.timings
    report = chaos.check()
    for _job, server, seconds in report.duplicate_copies:
        chaos.record_figure("broker restart duplicate", seconds, grace.duplicate_grace, server)
    report.assert_ok(cancel_grace=grace.cancel_grace, duplicate_grace=grace.duplicate_grace)
    await chaos.wait_view_converges(ids + kept, within=BOUND_VIEW + 5, figure="broker restart view")
    chaos.check().assert_ok(cancel_grace=grace.cancel_grace, duplicate_grace=grace.duplicate_grace)


async def test_manager_kill_9_jobs_keep_running_new_jobs_start_and_the_view_catches_up(
    chaos: ChaosCluster,
) -> None:
    ids = await _three_servers_with_jobs(chaos)
    chaos.kill_manager()
    # without a manager: a server dies, new jobs are created, one is cancelled
    victim = max(("s1", "s2", "s3"), key=lambda s: len(_on(chaos, s)))
    chaos.kill9(victim)
    more = await chaos.create(3, prefix="while-down")
    await chaos.wait_all_running(ids + more, within=BOUND_KILL + 2, exclude=(victim,))
    await chaos.cancel(ids[0])
    await asyncio.sleep(2)
    assert not [c for c in chaos.live_copies() if c.job == ids[0]]
    await chaos.start_manager()
    survivors = ids[1:] + more
    await chaos.wait_view_converges(survivors, within=BOUND_VIEW + 10, figure="manager restart")
    record = next(j for j in await chaos.jobs() if j.id == ids[0])
    # Cancelled for good; "deleted" may wait for the new manager's first sweep of the
    # dead victim (its owner): wait_cancels_final bounds that below.
    assert record.status in (JobStatus.DELETING, JobStatus.DELETED)
    # Its copy stopped at the client's broadcast; "deleted" needs the new manager.
    since_cancel = time.time() - chaos.cancelled_at[ids[0]]
    await chaos.wait_cancels_final(within=BOUND_CANCEL, deleted_within=since_cancel + BOUND_VIEW)
    chaos.check().assert_ok()


async def test_postgresql_restart_servers_are_unaffected_and_no_status_is_lost(
    chaos: ChaosCluster,
) -> None:
    ids = await _three_servers_with_jobs(chaos)
    started = time.time()
    restart = asyncio.create_task(chaos.restart_postgres())  # asserts it did restart
    await asyncio.sleep(0.2)
    kept, _ = await _burst(chaos, "while-db-restarts")  # the storage retries
    back = await restart
    chaos.record_figure("postgres restart itself", back - started, 30.0, "PostgreSQL back")
    # the test's own storage pool reconnects too; meanwhile jobs keep running
    await chaos.wait_all_running(ids + kept, within=5)
    victim = max(("s1", "s2", "s3"), key=lambda s: len(_on(chaos, s)))
    chaos.kill9(victim)
    await chaos.wait_all_running(
        ids, within=BOUND_KILL, exclude=(victim,), figure="postgres restart kill -9"
    )
    await chaos.wait_view_converges(ids, within=BOUND_VIEW + 10, figure="postgres restart")
    await chaos.wait_cancels_final(within=BOUND_CANCEL, deleted_within=BOUND_VIEW + 10)
    chaos.check().assert_ok()


async def test_creates_and_cancels_during_a_server_kill_are_honoured(chaos: ChaosCluster) -> None:
    ids = await _three_servers_with_jobs(chaos)
    victim = max(("s1", "s2", "s3"), key=lambda s: len(_on(chaos, s)))

    async def burst() -> list[str]:
        created = await chaos.create(10, prefix="burst")
        for job_id in created[::2]:
            await chaos.cancel(job_id)
        return created

    task = asyncio.create_task(burst())
    await asyncio.sleep(0.05)
    chaos.kill9(victim)
    created = await task
    survivors = ids + created[1::2]
    await chaos.wait_all_running(
        survivors, within=BOUND_KILL + 3, exclude=(victim,), figure="burst kill -9"
    )
    await asyncio.sleep(1.0)
    for job_id in created[::2]:
        assert not [c for c in chaos.live_copies() if c.job == job_id]
    await chaos.wait_cancels_final(within=BOUND_KILL + 3, figure="burst kill -9 cancels")
    chaos.check().assert_ok()


async def test_a_joining_server_gets_its_share_and_no_job_moves_twice(chaos: ChaosCluster) -> None:
    for name in ("s1", "s2"):
        await chaos.add_server(name, 10)
    ids = await chaos.create(12)
    await chaos.wait_all_running(ids, within=30)
    joined = time.time()
    await chaos.add_server("s3", 10)

    def share(name: str) -> int:
        return len(_on(chaos, name))

    deadline = time.time() + 20
    while not (3 <= share("s3") <= 5 and max(share("s1"), share("s2")) <= 5):
        assert time.time() < deadline, {n: share(n) for n in ("s1", "s2", "s3")}
        await asyncio.sleep(0.2)
    chaos.record_figure("rebalance", time.time() - joined, 20.0, "s3 holds its share")
    await asyncio.sleep(5)  # later rounds change nothing once balanced
    await chaos.wait_all_running(ids, within=5)
    assert all(abs(share(n) - 4) <= 1 for n in ("s1", "s2", "s3"))
    copies = chaos.copies()
    assert max(sum(1 for c in copies if c.job == j) for j in ids) <= 2  # moved at most once
    chaos.check().assert_ok()


async def test_servers_drain_hands_every_job_over_and_the_server_exits(
    chaos: ChaosCluster,
) -> None:
    ids = await _three_servers_with_jobs(chaos)
    victim = max(("s1", "s2", "s3"), key=lambda s: len(_on(chaos, s)))
    deadline = time.time() + BOUND_VIEW
    while not (known := [s for s in await chaos.servers() if s.name == victim]):
        assert time.time() < deadline, f"the manager never saw {victim}"
        await asyncio.sleep(0.1)
    server = known[0]
    asked = time.time()
    out = await chaos.cli("servers", "drain", server.id, "--transport", chaos.transport_url())
    assert victim in out
    assert await chaos.wait_exit(victim, 15) == 0
    await chaos.wait_all_running(ids, within=BOUND_SIGTERM, exclude=(victim,))
    took = time.time() - asked
    chaos.record_figure("drain", took, BOUND_SIGTERM, "all jobs running elsewhere")
    chaos.check().assert_ok()


async def test_at_capacity_jobs_wait_through_kill_9_and_rebalance_and_no_server_exceeds_it(
    chaos: ChaosCluster,
) -> None:
    """I6 where it can fire: more jobs than slots, so some wait, through a kill -9
    (fewer slots still) and a joining server (the waiting jobs start, then a
    rebalancing round moves jobs onto it)."""
    for name in ("s1", "s2", "s3"):
        await chaos.add_server(name, 5)
    ids = await chaos.create(18)  # 15 slots: 3 wait
    await chaos.wait_running(ids, 15, within=30)
    assert {n: len(_on(chaos, n)) for n in ("s1", "s2", "s3")} == {"s1": 5, "s2": 5, "s3": 5}
    chaos.check().assert_ok()

    chaos.kill9("s1")  # 10 slots for 18 jobs: its 5 wait too, nobody takes them
    await asyncio.sleep(2)
    await chaos.wait_running(ids, 10, within=1, exclude=("s1",))
    assert {n: len(_on(chaos, n)) for n in ("s2", "s3")} == {"s2": 5, "s3": 5}
    chaos.check().assert_ok()

    joined = time.time()
    await chaos.add_server("s4", 20)  # 30 slots: the 8 waiting start there
    await chaos.wait_all_running(ids, within=30, exclude=("s1",), figure="capacity queue drained")

    def balanced() -> bool:  # shares of 18 jobs over 5 + 5 + 20 slots: 3, 3, 12
        return (
            max(len(_on(chaos, "s2")), len(_on(chaos, "s3"))) <= 4 and len(_on(chaos, "s4")) >= 10
        )

    deadline = time.time() + 20
    while not balanced():
        assert time.time() < deadline, {n: len(_on(chaos, n)) for n in ("s2", "s3", "s4")}
        await asyncio.sleep(0.2)
    chaos.record_figure("capacity rebalanced", time.time() - joined, 20.0, "s4 holds its share")
    await chaos.wait_all_running(ids, within=5, exclude=("s1",))
    await chaos.wait_view_converges(ids, within=BOUND_VIEW, figure="capacity view")
    chaos.check().assert_ok()


@pytest.mark.slow
async def test_total_blackout_everything_restarts_in_random_order(chaos: ChaosCluster) -> None:
    ids = await _three_servers_with_jobs(chaos)
    rng, _ = seeded()
    for name in list(chaos.procs):
        chaos.kill9(name)
    chaos.kill_manager()
    await chaos.restart_broker()
    blackout_over = time.time()
    steps = ["postgres", "manager", "s1", "s2", "s3"]
    rng.shuffle(steps)
    for step in steps:
        if step == "postgres":
            await chaos.restart_postgres()
        elif step == "manager":
            await chaos.start_manager()
        else:
            await chaos.add_server(f"{step}-again", 10)
        await asyncio.sleep(rng.uniform(0, 1.5))
    await chaos.wait_all_running(ids, within=BOUND_BROKER_RESTART)
    took = time.time() - blackout_over
    chaos.record_figure("blackout", took, BOUND_BROKER_RESTART, " -> ".join(steps))
    chaos.check().assert_ok()
    await chaos.wait_view_converges(ids, within=BOUND_VIEW + 10, figure="blackout view")
    chaos.check().assert_ok()


@pytest.mark.slow
async def test_seeded_soak_random_faults_keep_the_invariants(chaos: ChaosCluster) -> None:
    rng, seed = seeded()
    ids = await _three_servers_with_jobs(chaos, jobs=20)
    seconds = float(os.environ.get("CHAOS_SOAK_SECONDS", "120"))
    faults = ["kill", "term", "stop", "partition", "cancel", "create"]
    await _soak(chaos, rng, seed, ids, faults, until=time.time() + seconds, hold=(1, 6))


async def test_daily_seeded_short_soak_keeps_the_invariants(chaos: ChaosCluster) -> None:
    """The random-fault path on every run of the default suite: eight faults drawn
    from a seed that is the UTC date (printed; ``CHAOS_SEED`` reproduces a run),
    then the full checker. About a minute; the long soak above is ``slow``."""
    rng, seed = seeded(daily=True)
    ids = await _three_servers_with_jobs(chaos, jobs=12)
    faults = ["kill", "term", "partition", "cancel", "create"]
    # Partitions shorter than the fence (its earliest firing: F - F/3 = 3 s): the
    # self-fencing path is the partition test's and the slow soak's.
    await _soak(chaos, rng, seed, ids, faults, steps=8, hold=(0.5, 2.5))


async def _soak(
    chaos: ChaosCluster,
    rng: random.Random,
    seed: int,
    ids: list[str],
    faults: list[str],
    *,
    until: float | None = None,
    steps: int | None = None,
    hold: tuple[float, float],
) -> None:
    """Random faults until ``until`` or for ``steps`` steps (each server fault adds
    a spare server), then: every job running once, every cancel final, the checker."""
    spare = batches = step = 0
    while (until is None or time.time() < until) and (steps is None or step < steps):
        step += 1
        fault = rng.choice(faults)
        alive = [n for n, p in chaos.procs.items() if p.alive and p.killed_at is None]
        print(f"soak step {step}: {fault}")
        if fault in ("kill", "term", "stop", "partition") and len(alive) > 1:
            victim = rng.choice(alive)
            if fault == "kill":
                chaos.kill9(victim)
            elif fault == "term":
                chaos.sigterm(victim)
            elif fault == "stop":
                chaos.sigstop(victim)
                await asyncio.sleep(rng.uniform(*hold))
                chaos.sigcont(victim)
            else:
                chaos.partition(victim)
                await asyncio.sleep(rng.uniform(*hold))
                chaos.heal(victim)
            spare += 1
            await chaos.add_server(f"spare-{spare}", 10)
        elif fault == "cancel" and len(ids) > 5:
            job_id = ids.pop(rng.randrange(len(ids)))
            await chaos.cancel(job_id)
        else:
            # Names of their own: a cancelled job's name is taken until it is deleted
            # (naming by len(ids) repeated one after a cancel: DuplicateJobName).
            batches += 1
            ids += await chaos.create(2, prefix=f"soak-{batches}")
        await asyncio.sleep(rng.uniform(0.5, 3))
    await chaos.wait_all_running(ids, within=BOUND_SILENT + 10, figure="soak")
    await chaos.wait_cancels_final(within=BOUND_SILENT, figure="soak cancels")
    await chaos.wait_view_converges(ids, within=BOUND_VIEW, figure="soak view")
    report = chaos.check()
    assert not report.overlaps, (seed, report)
    report.assert_ok()


# -- lifecycle controls: I8 (held means held) and I9 (checkpoints follow the fence) ------------


async def test_pause_resume_and_checkpoints_through_kill_9_and_a_partitioned_old_owner(
    chaos: ChaosCluster,
) -> None:
    """Paused jobs stop within the bound and stay stopped through a kill -9 and a
    partition; moved jobs start from the checkpoint their dead owner last sent; a
    partitioned old owner that keeps recording checkpoints (its heartbeats flush on
    heal) never overwrites its successor's; a resumed job starts from its last one."""
    for name in ("s1", "s2", "s3"):
        await chaos.add_server(name, 10, job="tests.chaos.jobs:checkpoint_job")
    ids = await chaos.create(9, prefix="cp")
    await chaos.wait_all_running(ids, within=30)
    await asyncio.sleep(1.5)  # a few heartbeats carry checkpoints
    paused, live = ids[:2], ids[2:]
    for job_id in paused:
        await chaos.pause(job_id)
    await chaos.wait_paused(paused, within=BOUND_CANCEL)

    victim = max(("s1", "s2", "s3"), key=lambda s: len(_on(chaos, s)))
    moved = _on(chaos, victim)
    assert moved
    killed = chaos.kill9(victim)
    await chaos.wait_all_running(live, within=BOUND_KILL, exclude=(victim,), figure="kill -9 cp")
    after_kill = [c for c in chaos.copies() if c.job in moved and c.start > killed]
    assert after_kill and all(c.got_checkpoint is not None for c in after_kill), after_kill

    survivors = [s for s in ("s1", "s2", "s3") if s != victim]
    cut = max(survivors, key=lambda s: len(_on(chaos, s)))
    cut_off = [j for j in _on(chaos, cut) if j in live]
    chaos.partition(cut)
    await chaos.wait_all_running(
        live, within=BOUND_SILENT, exclude=(victim, cut), figure="partition cp"
    )
    healed = chaos.heal(cut)
    await chaos.wait_server_seen(cut, healed, within=BOUND_VIEW)
    await asyncio.sleep(2)  # its queued heartbeats, stale checkpoints included, arrive

    await chaos.resume(paused[0])
    await chaos.wait_all_running([*live, paused[0]], within=10)
    resumed = max((c for c in chaos.copies() if c.job == paused[0]), key=lambda c: c.start)
    assert resumed.got_checkpoint is not None, resumed
    chaos.check().assert_ok()  # I1..I4, I6, I8 (the paused jobs), I9 (every start)
    records = {job.id: job for job in await chaos.jobs()}
    assert records[paused[1]].status is JobStatus.PAUSED
    for job_id in ids:
        record = records[job_id]
        assert record.checkpoint_fence is not None
        assert record.checkpoint_fence <= record.fence, record
    # The partitioned old owner kept writing (its heartbeats flushed on heal): the
    # stored checkpoint of each job it lost is still its new owner's.
    assert cut_off
    for job_id in cut_off:
        assert records[job_id].checkpoint_fence == records[job_id].fence, records[job_id]


async def test_pause_resume_and_checkpoints_through_a_rebalance(chaos: ChaosCluster) -> None:
    """I8 and I9 through a rebalance: a server joins and the leader moves jobs onto
    it (each a clean hand-over: released, then started by a larger token). Moved
    jobs start from the checkpoint their previous owner last sent; a job paused
    before the round is never moved onto the newcomer nor started anywhere; one
    resumed during the round runs once, from its checkpoint; a job paused while it
    is being moved stops within the bound. The stored checkpoint of every running
    job is its current owner's (an old owner's late one never overwrites it)."""
    for name in ("s1", "s2"):
        await chaos.add_server(name, 10, job="tests.chaos.jobs:checkpoint_job")
    ids = await chaos.create(10, prefix="rb")
    await chaos.wait_all_running(ids, within=30)
    await asyncio.sleep(1.5)  # a few heartbeats carry checkpoints
    held, resumed_later, live = ids[:1], ids[1], ids[2:]
    for job_id in (*held, resumed_later):
        await chaos.pause(job_id)
    await chaos.wait_paused([*held, resumed_later], within=BOUND_CANCEL)

    joined = time.time()
    await chaos.add_server("s3", 10, job="tests.chaos.jobs:checkpoint_job")
    await chaos.resume(resumed_later)  # its new message may land on any server
    deadline = time.time() + 20
    # The leader trims servers more than one job above their share; the jobs it
    # releases go to whichever server with room takes them first, so 4/4/1 is a
    # resting state too: wait for the newcomer to hold a moved job.
    while not [j for j in _on(chaos, "s3") if j in live]:
        assert time.time() < deadline, {n: len(_on(chaos, n)) for n in ("s1", "s2", "s3")}
        await asyncio.sleep(0.2)
    chaos.record_figure("rebalance cp", time.time() - joined, 20.0, "s3 holds its share")
    moving = next(c.job for c in chaos.live_copies() if c.server != "s3" and c.job in live)
    await chaos.pause(moving)  # paused right after a round, wherever it runs now
    await chaos.wait_paused([moving], within=BOUND_CANCEL)
    await chaos.wait_all_running(
        [j for j in [*live, resumed_later] if j != moving], within=10, figure="rebalance cp all"
    )

    copies = chaos.copies()
    moved = [c for c in copies if c.server == "s3" and c.start > joined and c.job in live]
    assert moved, "the rebalance moved nothing"
    assert all(c.got_checkpoint is not None for c in moved), moved
    assert not [c for c in copies if c.job in held and c.start > joined]  # never moved
    again = [c for c in copies if c.job == resumed_later and c.start > joined]
    assert again and again[0].got_checkpoint is not None, again
    await asyncio.sleep(1.5)  # the current owners' checkpoints reach the manager
    chaos.check().assert_ok()  # I1..I4, I6, I8 (three holds), I9 (every start)
    running = [j for j in [*live, resumed_later] if j != moving]
    deadline = time.time() + BOUND_VIEW
    while True:  # the leader may be moving a job at this instant: pending, then running
        records = {job.id: job for job in await chaos.jobs()}
        settled = all(
            records[j].status is JobStatus.PROCESSING
            and records[j].checkpoint_fence == records[j].fence
            for j in running
        )
        if settled or time.time() > deadline:
            break
        await asyncio.sleep(0.5)
    assert {records[j].status for j in [*held, moving]} == {JobStatus.PAUSED}
    for job_id in running:
        record = records[job_id]
        assert record.status is JobStatus.PROCESSING, record
        assert record.checkpoint_fence == record.fence, record  # the current owner's


# -- updating a job's argument: a fenced restart, I1-I4 and I8 ---------------------------------


async def test_an_update_restarts_the_job_once_with_the_new_argument_also_through_kill_9(
    chaos: ChaosCluster,
) -> None:
    """An update restarts a running job with the new argument exactly once: its
    old copy stops within the bound, nothing runs in between (I8), never two
    copies (I1). An update whose owner is killed (kill -9) right after it is not
    lost: the job restarts elsewhere with the new argument, and no copy with the
    old argument starts after the update."""
    ids = await _three_servers_with_jobs(chaos)
    first = ids[0]
    updated_at = {first: await chaos.update(first, "v2")}
    await chaos.wait_restarted([first], "v2", within=BOUND_CANCEL + 3, figure="update restart")

    # The victim is not the server that now runs the first job (else its kill
    # moves that job once more, and its copies after the update are two).
    first_on = {c.server for c in chaos.live_copies() if c.job == first}
    victim = max(
        (s for s in ("s1", "s2", "s3") if s not in first_on), key=lambda s: len(_on(chaos, s))
    )
    on_victim = [j for j in _on(chaos, victim) if j != first]
    assert on_victim
    doomed = on_victim[0]
    updated_at[doomed] = await chaos.update(doomed, "v2")
    chaos.kill9(victim)
    await chaos.wait_restarted(
        [doomed], "v2", within=BOUND_KILL + BOUND_VIEW, figure="update restart through kill -9"
    )
    await chaos.wait_all_running(ids, within=BOUND_KILL + BOUND_VIEW, exclude=(victim,))
    await asyncio.sleep(2)  # anything that would bring the old argument back has time to
    copies = chaos.copies()
    for job_id, at in updated_at.items():
        after = [c for c in copies if c.job == job_id and c.start > at]
        # Never the old argument again. One restart by the update: one message,
        # so every copy after it carries one generation (the relay used to send
        # it again under a further one); the leader's rebalancing (or a kill) may
        # move that message once more afterwards, a clean hand-over with the new
        # argument under the same generation (never two at once: I1 below).
        assert after and {c.argument for c in after} == {"v2"}, after
        assert len({split_fence(c.fence)[0] for c in after}) == 1, after
        assert len(after) <= 2, after
    await chaos.wait_view_converges(ids, within=BOUND_VIEW)
    chaos.check().assert_ok()  # I1..I4, I6, I8 (the update's hold)
    records = {job.id: job for job in await chaos.jobs()}
    for job_id in updated_at:
        record = records[job_id]
        assert (record.status, record.argument, record.update_pending) == (
            JobStatus.PROCESSING,
            "v2",
            False,
        )
