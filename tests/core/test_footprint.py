"""What a running job costs a server: asyncio tasks and memory per idle job, and
how the server watches a delivery's loss without a task per job."""

from __future__ import annotations

import asyncio
import collections
import gc
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from orchestratr_core import JobArgument, OrchestratedServer, ServerOptions, StopToken
from orchestratr_core import protocol as p
from orchestratr_core.transport import Delivery
from orchestratr_memory.broker import MemoryBroker
from orchestratr_memory.transport import MemoryTransport
from tests.support.cluster import eventually, idle_job, job_message


class Rig:
    """One server on a memory broker, a publisher of job messages, and an event
    consumer that throws the events away (no manager: nothing else per job)."""

    def __init__(self) -> None:
        self.url = f"memory://fp-{uuid.uuid4().hex[:12]}"
        self.publisher = MemoryTransport(self.url)
        self.server: OrchestratedServer | None = None

    async def start(self, max_workers: int, **options: Any) -> OrchestratedServer:
        await self.publisher.connect()

        async def discard(event: p.Event) -> None:
            return None

        await self.publisher.consume_events(discard)
        self.server = OrchestratedServer(
            idle_job,
            transport=MemoryTransport(self.url),
            name="fp",
            max_workers=max_workers,
            options=ServerOptions(**options),
        )
        await self.server.start()
        return self.server

    async def publish(self, n: int) -> None:
        for i in range(n):
            await self.publisher.publish_job(job_message(i))

    async def wait_running(self, n: int, timeout: float = 60.0) -> None:
        assert self.server is not None
        server = self.server
        await eventually(lambda: len(server.running()) == n, timeout, 0.05, f"{n} running")

    async def close(self) -> None:
        if self.server is not None:
            await self.server.kill()
        await self.publisher.close()
        MemoryBroker.reset(self.url.removeprefix("memory://"))


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        await r.close()


async def test_a_running_job_costs_one_task_the_job_function(
    rig: Rig,
) -> None:
    n = 200
    await rig.start(n)
    before = len(asyncio.all_tasks())
    await rig.publish(n)
    await rig.wait_running(n)
    await asyncio.sleep(0.3)  # every job is in its sleep
    per_job = (len(asyncio.all_tasks()) - before) / n
    # It was 4 (supervisor, loss watcher, job, and a task waiting for a stop
    # request), then 2 (supervisor and job); the supervisor is now made only
    # when there is something to supervise (a stop, a loss, the job's end).
    assert per_job <= 1.02, f"{per_job:.2f} tasks per running job"


async def test_an_idle_job_costs_a_server_well_under_10_kb(rig: Rig) -> None:
    """tracemalloc over 2,000 idle jobs on the memory transport. Everything the
    process allocated for them counts: the server's part, the job functions, the
    transport's deliveries and the in-process broker's held messages. It was
    ~12.5 KB per job with five tasks and two events per job; now ~6.5 KB."""
    n = 2000
    await rig.start(n, heartbeat_interval=0.5)
    await asyncio.sleep(0.2)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        await rig.publish(n)
        await rig.wait_running(n)
        await asyncio.sleep(1.2)  # a few heartbeats: the event queue is back to empty
        gc.collect()
        per_job = (tracemalloc.get_traced_memory()[0] - base) / n
    finally:
        tracemalloc.stop()
    assert per_job < 8_500, f"{per_job:.0f} bytes per idle job"


async def test_a_heartbeat_builds_nothing_new_for_jobs_that_did_not_change(rig: Rig) -> None:
    """Every heartbeat lists every job; what it said about an unchanged job is
    reused (no new objects per job every 2 s), and a change is never missed."""
    server = await rig.start(20, heartbeat_interval=60.0)
    await rig.publish(20)
    await rig.wait_running(20)
    first = server._heartbeat_event()
    second = server._heartbeat_event()
    assert len(first.jobs) == 20
    assert all(a is b for a, b in zip(first.jobs, second.jobs, strict=True))
    run = server._runs[first.jobs[3].job_id]
    run.last_heartbeat = 12345.5
    run.restarts = 2
    third = {job.job_id: job for job in server._heartbeat_event().jobs}
    assert third[run.arg.job_id] == p.RunningJob(run.arg.job_id, run.arg.fence, 12345.5, 2)
    assert sum(third[job.job_id] is job for job in second.jobs) == 19
    assert not hasattr(third[run.arg.job_id], "__dict__")  # slots: one small object per job


class _ListWaitersEvent(asyncio.Event):
    """An asyncio.Event whose waiters are not the deque of CPython's asyncio:
    the server must fall back to a task that waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[asyncio.Future[bool]] = []  # type: ignore[assignment]


class _Delivery(Delivery):
    def __init__(self, job_id: str, lost: asyncio.Event) -> None:
        self._message = p.JobMessage(
            job_id=job_id, name=job_id, argument="", generation=1, created_at=0.0
        )
        self._lost = lost
        self.settled: list[str] = []

    @property
    def message(self) -> p.JobMessage:
        return self._message

    @property
    def delivery_count(self) -> int:
        return 0

    @property
    def lost(self) -> asyncio.Event:
        return self._lost

    async def ack(self) -> None:
        self.settled.append("ack")

    async def release(self) -> None:
        self.settled.append("release")


@pytest.mark.parametrize("event_type", [asyncio.Event, _ListWaitersEvent])
async def test_a_lost_delivery_stops_its_job_at_once_whatever_its_event(
    event_type: type[asyncio.Event],
) -> None:
    copies: dict[str, list[str]] = collections.defaultdict(list)

    async def ignores_its_token(arg: JobArgument, token: StopToken, heartbeat: Any) -> None:
        copies[arg.job_id].append("start")
        try:
            await asyncio.Event().wait()  # never looks at the token: only a hard stop ends it
        finally:
            copies[arg.job_id].append("end")

    server = OrchestratedServer(
        ignores_its_token,
        transport=MemoryTransport(f"memory://fp-{uuid.uuid4().hex[:12]}"),
        max_workers=4,
        options=ServerOptions(stop_grace=30.0),
    )
    before = len(asyncio.all_tasks())
    deliveries = [_Delivery(f"job-{i}", event_type()) for i in range(2)]
    for delivery in deliveries:
        await server._on_delivery(delivery)
    await eventually(lambda: len(copies) == 2, what="both running")
    tasks = len(asyncio.all_tasks()) - before
    # One per job (the job function) on CPython's asyncio.Event; a second (the
    # watcher) otherwise. The loss makes the supervisor, which stops the job hard.
    assert tasks == (2 if event_type is asyncio.Event else 4)
    lost_at = time.monotonic()
    deliveries[0].lost.set()
    await eventually(lambda: copies["job-0"] == ["start", "end"], 2.0, what="lost job ended")
    assert time.monotonic() - lost_at < 1.0  # hard, at once: no stop_grace
    assert copies["job-1"] == ["start"]
    assert server.running().keys() == {"job-1"}
    await eventually(lambda: "job-0" not in server._runs, what="job-0 finished")
    assert deliveries[0].settled == []  # a lost delivery is never settled
    stopped = [e for e in _queued(server) if isinstance(e, p.JobStopped)]
    assert [(e.job_id, e.reason) for e in stopped] == [("job-0", p.StopReason.LOST)]
    # The job that still runs is watched no more than before; nothing is left
    # behind in the event it watches once it ends.
    deliveries[1].lost.set()
    await eventually(lambda: not server._runs, what="job-1 finished")
    assert len(asyncio.all_tasks()) == before
    for delivery in deliveries:
        assert not list(delivery.lost._waiters)


async def test_a_job_that_ends_leaves_no_waiter_in_its_deliverys_event() -> None:
    async def returns_at_once(arg: JobArgument, token: StopToken, heartbeat: Any) -> None:
        return None

    server = OrchestratedServer(
        returns_at_once,
        transport=MemoryTransport(f"memory://fp-{uuid.uuid4().hex[:12]}"),
        max_workers=4,
    )
    delivery = _Delivery("job", asyncio.Event())
    await server._on_delivery(delivery)
    await eventually(lambda: not server._runs, what="completed")
    assert delivery.settled == ["ack"]
    assert not delivery.lost._waiters


def _queued(server: OrchestratedServer) -> list[p.Event]:
    return list(server._outbox.queue._queue)  # type: ignore[attr-defined]


# -- the garbage collector ---------------------------------------------------------------


@pytest.fixture
def thawed() -> Iterator[None]:
    """Leave the collector as a test found it (frozen objects thawed)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_the_freezer_freezes_after_growth_and_thaws_after_many_jobs_ended(thawed: None) -> None:
    from orchestratr_core.server.run import GcFreezer as _GcFreezer

    freezer = _GcFreezer(least=10)
    freezer.tend(running=9)
    assert gc.get_freeze_count() == 0  # few jobs: the collector is left alone
    freezer.tend(running=12)
    frozen = gc.get_freeze_count()
    assert frozen > 0
    freezer.ended = 9
    freezer.tend(running=3)
    assert gc.get_freeze_count() >= frozen  # not enough ended yet: still frozen
    freezer.ended = 10
    freezer.tend(running=2)  # a full collection ran; two jobs are too few to freeze
    assert gc.get_freeze_count() == 0
    gc.disable()
    try:
        freezer.tend(running=50)
        assert gc.get_freeze_count() == 0  # an application that manages gc itself
    finally:
        gc.enable()


@pytest.mark.parametrize("freeze", [True, False])
async def test_a_server_with_thousands_of_jobs_keeps_them_out_of_full_collections(
    rig: Rig, thawed: None, freeze: bool
) -> None:
    await rig.start(1500, heartbeat_interval=0.2, freeze_gc=freeze)
    await rig.publish(1500)
    await rig.wait_running(1500)
    await asyncio.sleep(0.5)  # a heartbeat or two
    if freeze:
        # Every running job's objects (task, coroutines, token, delivery...) are
        # frozen: a full collection no longer walks them.
        assert gc.get_freeze_count() > 1500 * 10
    else:
        assert gc.get_freeze_count() == 0
