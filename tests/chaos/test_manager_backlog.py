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
    for name in ("live", "doomed"):
        await chaos.add_server(name, 10)
    ids = await chaos.create(8)
    await chaos.wait_all_running(ids, within=30)
    for name in ("live", "doomed"):
        await chaos.wait_server_status(name, "alive", within=10)
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
