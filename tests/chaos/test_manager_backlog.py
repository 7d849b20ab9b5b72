"""A manager that falls behind its events queue (real processes, the real broker
and database): it declares no live server dead because that server's heartbeats
wait in the queue behind others, and it still declares a dead server dead once
it has caught up (``orchestratr_core.frontier``; docs/reliability.md)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from orchestratr_core import protocol as p
from orchestratr_core.job import ServerStatus
from tests.chaos.harness import ChaosCluster

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgresql]

FLOOD = 3000
"""Heartbeats of a made-up server queued ahead of the live server's: each is a
storage write for the manager, several seconds of work in all."""
MARGIN = 3.0
"""Seconds on top of the bound for a loaded machine (a sweep, the poll)."""


async def _flood(chaos: ChaosCluster, count: int) -> None:
    """Publish ``count`` heartbeats of a server that lists no job (confirmed)."""
    assert chaos.transport is not None
    now = time.time()
    beat = p.ServerHeartbeat(
        server_id=f"flood-{chaos.run_id}", name="flood", max_workers=1, started_at=now, sent_at=now
    )
    for start in range(0, count, 200):
        await asyncio.gather(
            *(chaos.transport.publish_event(beat) for _ in range(min(200, count - start)))
        )


async def _live_and_doomed(chaos: ChaosCluster) -> list[str]:
    """Servers "live" and "doomed", both alive, running 8 jobs between them."""
    for name in ("live", "doomed"):
        await chaos.add_server(name, 10)
    ids = await chaos.create(8)
    await chaos.wait_all_running(ids, within=30)
    for name in ("live", "doomed"):
        await chaos.wait_server_status(name, "alive", within=10)
    return ids


async def test_a_manager_behind_its_events_declares_no_live_server_dead_but_a_dead_one(
    chaos: ChaosCluster,
) -> None:
    """The manager is frozen for twice the server timeout while one server is
    killed and thousands of events queue up ahead of the live server's
    heartbeats. Thawed, by the wall clock both servers look silent; the live one
    must stay ``alive`` (its jobs never released), and the killed one must be
    declared dead within the server timeout after the manager caught up."""
    assert chaos.transport is not None and chaos.manager is not None
    timeout = chaos.timings.server_timeout
    ids = await _live_and_doomed(chaos)
    live_id = next(s.id for s in await chaos.servers() if s.name == "live")
    manager = chaos.manager
    os.kill(manager.pid, signal.SIGSTOP)
    try:
        chaos.kill9("doomed")
        await _flood(chaos, FLOOD)
        await asyncio.sleep(2 * timeout)
    finally:
        os.kill(manager.pid, signal.SIGCONT)
    thawed = time.time()
    backlog = await chaos.transport.events_backlog()
    assert backlog is not None and backlog > FLOOD // 2, backlog  # it is behind
    caught_up: float | None = None
    dead_after: float | None = None
    # Watch until it caught up, then for two server timeouts more.
    while caught_up is None or time.time() < caught_up + 2 * timeout:
        servers = {s.id: s for s in await chaos.servers()}
        live = servers[live_id]
        assert live.status is ServerStatus.ALIVE, (
            f"the live server was declared {live.status.value} "
            f"{time.time() - thawed:.1f} s after the thaw, with the manager behind"
        )
        if caught_up is None and await chaos.transport.events_backlog() == 0:
            caught_up = time.time()
        doomed = next(s for s in servers.values() if s.name == "doomed")
        if dead_after is None and doomed.status is ServerStatus.DEAD:
            dead_after = time.time() - thawed
        assert time.time() - thawed < 120, "the manager never caught up"
        await asyncio.sleep(0.05)
    assert caught_up is not None
    drained = caught_up - thawed
    bound = drained + timeout + MARGIN
    if dead_after is None:
        await chaos.wait_server_status("doomed", "dead", within=thawed + bound - time.time())
        dead_after = time.time() - thawed
    print(f"manager behind: {backlog} events queued at the thaw, drained in {drained:.1f} s")
    chaos.record_figure(
        "manager behind: dead server declared dead", dead_after, bound, "after the thaw"
    )
    assert dead_after <= bound
    await chaos.wait_all_running(ids, within=10, exclude=("doomed",))
    await chaos.wait_view_converges(ids, within=10, figure="manager behind view")
    chaos.check().assert_ok()


LEASE = 3.0
"""The managers' leader lease in the next test (the harness's default is longer)."""


async def test_a_leader_that_does_not_consume_the_events_declares_no_live_server_dead(
    chaos: ChaosCluster,
) -> None:
    """Two managers: the first is the leader and the events queue's active
    consumer. It is frozen (SIGSTOP: its connections stay open and its AMQP
    heartbeat is long, so the broker keeps the events for it) while a server is
    killed; the second takes the lease and leads, but applies no event. By the
    wall clock every server looks silent; the new leader must judge by what the
    consumer wrote (the freshest ``last_seen``, frozen too) and declare no
    server dead -- a ``make chaos-cluster`` run saw a live server declared dead
    this way, its jobs left ``pending`` while it ran them. Thawed, the first
    catches up; the killed server is declared dead, the live one never."""
    assert chaos.transport is not None and chaos.manager is not None
    timeout = chaos.timings.server_timeout
    chaos.kill_manager(chaos.manager)  # the harness's own has the default lease
    # A long AMQP heartbeat: the broker keeps the frozen one's consumer registered.
    first = await chaos.start_manager(leader_lease=LEASE, broker_heartbeat=60)
    ids = await _live_and_doomed(chaos)
    second = await chaos.start_manager(leader_lease=LEASE)
    await asyncio.sleep(1.0)  # it has joined the events queue (inactive) and tried the lease
    live_id = next(s.id for s in await chaos.servers() if s.name == "live")
    os.kill(first.pid, signal.SIGSTOP)
    frozen = time.time()
    try:
        chaos.kill9("doomed")
        # The lease runs out, the second leads for its grace (one server timeout)
        # and then judges, sweep after sweep: three server timeouts of that.
        while time.time() < frozen + LEASE + 4 * timeout:
            live = next(s for s in await chaos.servers() if s.id == live_id)
            assert live.status is ServerStatus.ALIVE, (
                f"the live server was declared {live.status.value} "
                f"{time.time() - frozen:.1f} s into the freeze, by a leader "
                "that does not consume the events"
            )
            await asyncio.sleep(0.1)
        # Nobody applied the live server's heartbeats: they wait in the queue, or
        # in the frozen consumer, which takes events ahead of the one it applies.
        live = next(s for s in await chaos.servers() if s.id == live_id)
        assert live.last_seen.timestamp() <= frozen + 0.5, (live.last_seen, frozen)
        holder = await chaos.lease_holder()
        assert holder is not None and f"manager started id={holder}" in second.log.read_text(
            errors="replace"
        ), "the second manager does not lead: the test proves nothing"
    finally:
        os.kill(first.pid, signal.SIGCONT)
    thawed = time.time()
    dead_after: float | None = None
    while time.time() < thawed + 4 * timeout + MARGIN:
        servers = {s.name: s for s in await chaos.servers()}
        assert servers["live"].status is ServerStatus.ALIVE, servers["live"]
        if servers["doomed"].status is ServerStatus.DEAD:
            dead_after = time.time() - thawed
            break
        await asyncio.sleep(0.05)
    assert dead_after is not None, "the killed server was not declared dead after the thaw"
    chaos.record_figure(
        "leader not consuming the events: dead server declared dead",
        dead_after,
        4 * timeout + MARGIN,
        "after the consumer's thaw",
    )
    await chaos.wait_all_running(ids, within=10, exclude=("doomed",))
    await chaos.wait_view_converges(ids, within=10, figure="leader not consuming: view")
    chaos.check().assert_ok()
