"""A server whose transport or runner misbehaves: its background duties log the
fault and go on (heartbeats never stop silently); its hooks are the documented ones."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

from orchestratr_core import JobArgument, OrchestratedServer, StopToken
from orchestratr_core import protocol as p
from orchestratr_core.plugin.manager import PluginManager
from orchestratr_core.plugin.spec import hookimpl
from orchestratr_core.runner import AsyncJobRunner
from orchestratr_core.transport import Transport
from orchestratr_memory.transport import MemoryTransport
from tests.support.cluster import FAST_SERVER, Cluster, eventually


class _FaultyTransport(MemoryTransport):
    """Fails the first heartbeats it is asked to publish with ``faults``, one each."""

    def __init__(self, url: str, faults: list[BaseException]) -> None:
        super().__init__(url)
        self.faults = faults
        self.heartbeats_sent: list[float] = []

    async def publish_event(self, event: p.Event) -> None:
        if isinstance(event, p.ServerHeartbeat) and self.faults:
            raise self.faults.pop(0)
        await super().publish_event(event)
        if isinstance(event, p.ServerHeartbeat):
            self.heartbeats_sent.append(time.monotonic())


async def _idle(arg: JobArgument, token: StopToken, heartbeat: Callable[[], None]) -> None:
    await token.wait()


@pytest.mark.parametrize(
    "fault",
    [RuntimeError("a bug in the transport"), asyncio.CancelledError()],
    ids=["unexpected-error", "stray-cancellation"],
)
async def test_a_transport_fault_in_the_event_pump_is_logged_and_heartbeats_go_on(
    cluster: Cluster, caplog: pytest.LogCaptureFixture, fault: BaseException
) -> None:
    # A CancelledError raised out of the broker client once ended the pump silently,
    # and the server never heartbeated again.
    transport = _FaultyTransport(cluster.url, [fault, fault])
    server = OrchestratedServer(
        _idle, transport=transport, name="faulty", max_workers=2, options=FAST_SERVER
    )
    cluster.servers["faulty"] = server
    with caplog.at_level(logging.ERROR, logger="orchestratr"):
        await server.start()
        await eventually(
            lambda: len(transport.heartbeats_sent) >= 3,
            10.0,
            what="heartbeats published after the faults",
        )
    assert not transport.faults
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("publishing heartbeat" in r.getMessage() for r in errors), errors
    assert all(r.exc_info is not None for r in errors)


async def test_a_failing_heartbeat_loop_is_logged_and_restarted(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    transport = _FaultyTransport(cluster.url, [])
    server = OrchestratedServer(
        _idle, transport=transport, name="tended", max_workers=2, options=FAST_SERVER
    )
    cluster.servers["tended"] = server
    failures = [RuntimeError("the collector broke")]

    class _BrokenFreezer:
        ended = 0

        def tend(self, running: int) -> None:
            if failures:
                raise failures.pop(0)

    server._gc = _BrokenFreezer()  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="orchestratr"):
        await server.start()
        await eventually(lambda: not failures, 10.0, what="the fault injected")
        after = len(transport.heartbeats_sent)
        await eventually(
            lambda: len(transport.heartbeats_sent) >= after + 2,
            10.0,
            what="heartbeats after the heartbeat loop failed",
        )
    assert any(
        "the heartbeat loop failed" in r.getMessage() and r.exc_info is not None
        for r in caplog.records
    )


async def test_kill_uses_the_transports_crash_hook_and_a_transport_without_one_still_dies(
    cluster: Cluster,
) -> None:
    crashed = await cluster.add_server("crashing")
    memory = crashed.transport
    assert isinstance(memory, MemoryTransport)
    await crashed.kill()
    assert memory._state.name == "CRASHED"

    class _Plain(_FaultyTransport):
        crash = Transport.crash  # the contract's default: nothing to do

    plain = _Plain(cluster.url, [])
    server = OrchestratedServer(_idle, transport=plain, name="plain", options=FAST_SERVER)
    await server.start()
    await server.kill()
    assert plain._state.name == "CLOSED"

    class _Awaited(_FaultyTransport):
        async def crash(self) -> None:  # type: ignore[override]  # a coroutine is awaited
            await asyncio.sleep(0)
            MemoryTransport.crash(self)

    awaited = _Awaited(cluster.url, [])
    server = OrchestratedServer(_idle, transport=awaited, name="awaited", options=FAST_SERVER)
    await server.start()
    await server.kill()
    assert awaited._state.name == "CRASHED"


async def test_the_server_tells_its_runner_how_many_jobs_it_runs_at_once() -> None:
    sizes: list[int] = []

    class _SizedRunner(AsyncJobRunner):
        def resize(self, max_workers: int) -> None:
            sizes.append(max_workers)

    class _Plugin:
        @hookimpl(tryfirst=True)
        def orchestratr_make_runner(self, func: Any) -> AsyncJobRunner:
            return _SizedRunner()

    plugins = PluginManager()  # not the process-wide one: this plugin is for this test
    plugins.pluggy.register(_Plugin())
    transport = MemoryTransport("memory://sized")
    OrchestratedServer(_idle, transport=transport, max_workers=7, plugins=plugins)
    assert sizes == [7]
