"""Real servers on any transport with the test as their manager, for the server
half of an update in place (``@updatable``, ``UpdateJob``, drop marks): the test
publishes the job, reads the servers' events and sends the commands."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestratr_core import JobArgument, OrchestratedServer, StopToken
from orchestratr_core import protocol as p
from orchestratr_core.job import make_fence, new_id
from orchestratr_core.lifecycle import drop_mark, updatable
from orchestratr_core.runner import UpdatableHeartbeat
from orchestratr_core.transport import Transport
from tests.support.cluster import FAST_SERVER, eventually


@dataclass
class Seen:
    """What the job functions and the server's events showed."""

    calls: list[str] = field(default_factory=list)
    """The argument of every call of a job function (one per copy or restart)."""
    updates: list[str] = field(default_factory=list)
    """The arguments a function received without a restart."""
    events: list[p.Event] = field(default_factory=list)

    def updated(self) -> list[tuple[str, int, int]]:
        return [
            (e.job_id, e.fence, e.argument_version)
            for e in self.events
            if isinstance(e, p.JobUpdated)
        ]

    def heartbeats(self) -> list[p.ServerHeartbeat]:
        return [e for e in self.events if isinstance(e, p.ServerHeartbeat)]

    def starts(self, job_id: str) -> int:
        """How many starts of ``job_id`` the servers reported (``JobStarted``
        events and the starts heartbeats carry), one per (server, fence)."""
        reported = {
            (e.server_id, e.fence)
            for e in self.events
            if isinstance(e, p.JobStarted) and e.job_id == job_id
        }
        for beat in self.heartbeats():
            reported |= {
                (beat.server_id, j.fence)
                for j in beat.jobs
                if j.job_id == job_id and j.job_id in beat.started
            }
        return len(reported)


class Fleet:
    """One broker, the test as its manager, servers added by the test (each on a
    transport of ``make``)."""

    def __init__(self, make: Callable[[], Transport], timeout: float = 5.0) -> None:
        self.make = make
        self.timeout = timeout
        self.seen = Seen()
        self.manager = make()
        self.servers: list[OrchestratedServer] = []

    async def start(self) -> None:
        async def on_event(event: p.Event) -> None:
            self.seen.events.append(event)

        await self.manager.connect()
        await self.manager.consume_events(on_event)

    async def server(self, job: object) -> OrchestratedServer:
        server = OrchestratedServer(
            job,  # type: ignore[arg-type]
            transport=self.make(),
            name=f"s{len(self.servers)}",
            max_workers=4,
            options=FAST_SERVER,
        )
        await server.start()
        self.servers.append(server)
        return server

    async def publish(self, argument: str) -> p.JobMessage:
        message = p.JobMessage(
            job_id=new_id(), name=f"j-{argument}", argument=argument, generation=1, created_at=0.0
        )
        await self.manager.publish_job(message)
        await eventually(lambda: argument in self.seen.calls, self.timeout, what="the job started")
        return message

    async def update(
        self, server: OrchestratedServer, job_id: str, version: int, argument: str, fence: int = 0
    ) -> None:
        command = p.UpdateJob(
            job_id=job_id,
            fence=fence or make_fence(1, 0),
            argument_version=version,
            argument=argument,
        )
        await self.manager.send_command(command, server.id)

    async def close(self) -> None:
        for server in self.servers:
            await server.kill()
        await self.manager.close()


def opted_in(seen: Seen) -> object:
    @updatable
    async def job(arg: JobArgument, token: StopToken, heartbeat: UpdatableHeartbeat) -> None:
        seen.calls.append(arg.argument)
        async for new in heartbeat.updates():
            assert new.job_id == arg.job_id and new.fence == arg.fence
            assert heartbeat.argument == new
            seen.updates.append(new.argument)

    return job


async def drop_mark_scenario(fleet: Fleet) -> None:
    """The owner's copy took the new argument in place; the broker still holds the
    old message. Under a drop mark the copy keeps running, and when the owner dies
    the redelivered old message is dropped, never started with the old argument;
    the message of the next generation (the new argument) starts."""
    seen = fleet.seen
    wait = fleet.timeout
    owner = await fleet.server(opted_in(seen))
    message = await fleet.publish("old")
    await fleet.update(owner, message.job_id, 1, "new")
    await eventually(lambda: seen.updates == ["new"], wait, what="the update in place")
    await eventually(
        lambda: (message.job_id, make_fence(1, 0), 1) in seen.updated(), wait, what="JobUpdated"
    )
    await fleet.manager.set_cancellations([drop_mark(message.job_id, message.generation)])
    await asyncio.sleep(3 * FAST_SERVER.heartbeat_interval)
    assert owner.running()[message.job_id].argument == "new"  # not stopped
    assert not [e for e in seen.events if isinstance(e, p.JobStopped)]
    assert seen.calls == ["old"]

    other = await fleet.server(opted_in(seen))
    await owner.kill()

    def discarded() -> bool:
        return any(isinstance(e, p.JobDiscarded) and e.server_id == other.id for e in seen.events)

    await eventually(discarded, 3 * wait, what="the old message dropped")
    assert seen.calls == ["old"] and message.job_id not in other.running()
    await fleet.manager.publish_job(
        dataclasses.replace(message, argument="new", generation=message.generation + 1)
    )
    await eventually(lambda: seen.calls == ["old", "new"], wait, what="the new generation started")
    assert other.running()[message.job_id].argument == "new"
    # One copy at a time: the old one ended (its owner died) before the new one began.
    # A start is reported as a JobStarted event or, folded, in a heartbeat's
    # ``started`` (under load), and may arrive a moment after the call.
    await eventually(lambda: seen.starts(message.job_id) >= 2, wait, what="both starts reported")
    assert seen.starts(message.job_id) == 2


async def run_drop_mark_scenario(make: Callable[[], Transport], timeout: float) -> None:
    """:func:`drop_mark_scenario` on a fleet of ``make``'s transports."""
    fleet = Fleet(make, timeout=timeout)
    await fleet.start()
    try:
        await drop_mark_scenario(fleet)
    finally:
        await fleet.close()
