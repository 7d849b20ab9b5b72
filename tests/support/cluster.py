"""A small in-process cluster on the memory backends, and a ledger of job copies.

The ledger is written by the job function itself, outside the framework: every
running copy records when it started and stopped, on which server and with which
fencing token. The invariant checks read only the ledger and the monitor.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from orchestratr_core import (
    JobArgument,
    ManagerOptions,
    OrchestratedServer,
    ServerManager,
    ServerOptions,
    StopToken,
)
from orchestratr_core import protocol as p
from orchestratr_core.job import JobRecord, JobStatus, new_id
from orchestratr_core.placement import DEFAULT_KIND, Pool
from orchestratr_memory import MemoryStorage
from orchestratr_memory.broker import MemoryBroker
from orchestratr_memory.transport import MemoryTransport

FAST_SERVER = ServerOptions(
    heartbeat_interval=0.2, stop_grace=1.0, restart_initial=0.05, restart_max=0.4
)
FAST_MANAGER = ManagerOptions(
    server_timeout=1.5, sweep_interval=0.1, leader_lease=1.0, cancellation_resync=1.0
)


async def idle_job(arg: JobArgument, token: StopToken, heartbeat: Callable[[], None]) -> None:
    """The benchmarks' idle job: report liveness, sleep until told to stop."""
    while True:
        heartbeat()
        if await token.sleep(10.0):
            return


def job_message(i: int) -> p.JobMessage:
    """A new job message, ``job-<i>`` with argument ``<i>``, as the client publishes it."""
    return p.JobMessage(
        job_id=new_id(), name=f"job-{i}", argument=str(i), generation=1, created_at=time.time()
    )


@dataclass
class Copy:
    """One running copy of a job, as the job function itself recorded it."""

    job_id: str
    name: str
    fence: int
    server: str
    start: float
    end: float | None = None
    writes: list[tuple[float, int]] = field(default_factory=list)
    kind: str = DEFAULT_KIND
    argument: str = ""


class Ledger:
    """What really ran, recorded by the job functions."""

    def __init__(self) -> None:
        self.copies: list[Copy] = []
        self.placements: dict[str, tuple[frozenset[str], dict[str, str]]] = {}
        """What each server (by name) runs and carries: its kinds and labels."""

    def job(self, server: str, *, body: Callable[..., Awaitable[None]] | None = None) -> Any:
        """A job function for ``server`` that records its copy and runs until stopped."""

        async def job(arg: JobArgument, token: StopToken, heartbeat: Callable[[], None]) -> None:
            copy = Copy(
                arg.job_id,
                arg.name,
                arg.fence,
                server,
                time.monotonic(),
                kind=arg.kind,
                argument=arg.argument,
            )
            self.copies.append(copy)
            try:
                if body is not None:
                    await body(arg, token, heartbeat)
                    return
                while not token.stop_requested:
                    heartbeat()
                    copy.writes.append((time.monotonic(), arg.fence))
                    await token.sleep(0.05)
            finally:
                copy.end = time.monotonic()

        return job

    def running(self, job_id: str | None = None) -> list[Copy]:
        """Copies still running (of one job, or of all)."""
        return [c for c in self.copies if c.end is None and (job_id is None or c.job_id == job_id)]

    def of(self, job_id: str) -> list[Copy]:
        """Every copy of one job."""
        return [c for c in self.copies if c.job_id == job_id]

    def overlaps(self) -> list[tuple[Copy, Copy, float]]:
        """I1: pairs of copies of one job that ran at the same time (every pair, not
        only neighbours), with how long both ran."""
        out = []
        by_job: dict[str, list[Copy]] = {}
        for c in self.copies:
            by_job.setdefault(c.job_id, []).append(c)
        now = time.monotonic()
        for copies in by_job.values():
            copies.sort(key=lambda c: c.start)
            for a, b in itertools.combinations(copies, 2):
                a_end = a.end if a.end is not None else now
                b_end = b.end if b.end is not None else now
                if b.start < a_end:
                    out.append((a, b, min(a_end, b_end) - b.start))
        return out

    def misplaced(self, pools: dict[str, Pool]) -> list[Copy]:
        """I7: copies that ran on a server that does not run their kind or whose
        labels do not satisfy their job's constraints (``pools``: job id -> pool),
        or that were handed to the function of another kind."""
        out = []
        for c in self.copies:
            kinds, labels = self.placements.get(c.server, (frozenset({DEFAULT_KIND}), {}))
            pool = pools.get(c.job_id, Pool())
            if c.kind != pool.kind or not pool.accepts(kinds, labels):
                out.append(c)
        return out

    def fences_grow(self) -> bool:
        """Each new copy of a job has a larger fencing token than every earlier one."""
        by_job: dict[str, list[Copy]] = {}
        for c in self.copies:
            by_job.setdefault(c.job_id, []).append(c)
        for copies in by_job.values():
            copies.sort(key=lambda c: c.start)
            fences = [c.fence for c in copies]
            # a restart on the same server keeps its fence; a new owner must grow it
            for a, b in itertools.pairwise(copies):
                if b.server != a.server and b.fence <= a.fence:
                    return False
            if fences != sorted(fences):
                return False
        return True


async def eventually(
    check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or check}; last={last!r}")
        await asyncio.sleep(interval)


class Cluster:
    """A manager and servers in one process, on one memory broker and storage."""

    def __init__(self, broker_name: str, ledger: Ledger) -> None:
        self.broker_name = broker_name
        self.url = f"memory://{broker_name}"
        self.ledger = ledger
        self.storage = MemoryStorage()
        self.manager: ServerManager | None = None
        self.servers: dict[str, OrchestratedServer] = {}

    @property
    def broker(self) -> MemoryBroker:
        return MemoryBroker.get(self.broker_name)

    def transport(self, **options: Any) -> MemoryTransport:
        return MemoryTransport(self.url, **options)

    async def start_manager(self, options: ManagerOptions = FAST_MANAGER) -> ServerManager:
        self.manager = ServerManager(
            storage=self.storage, transport=self.transport(), options=options
        )
        await self.manager.start()
        return self.manager

    async def add_server(
        self,
        name: str,
        max_workers: int = 10,
        *,
        job: Any = None,
        options: ServerOptions = FAST_SERVER,
        kinds: tuple[str, ...] | None = None,
        labels: dict[str, str] | None = None,
        max_workers_per_kind: dict[str, int] | None = None,
        **transport_options: Any,
    ) -> OrchestratedServer:
        functions = (
            {kind: self.ledger.job(name) for kind in kinds}
            if kinds is not None
            else job or self.ledger.job(name)
        )
        self.ledger.placements[name] = (frozenset(kinds or (DEFAULT_KIND,)), dict(labels or {}))
        server = OrchestratedServer(
            functions,
            transport=self.transport(**transport_options),
            name=name,
            max_workers=max_workers,
            options=options,
            labels=labels,
            max_workers_per_kind=max_workers_per_kind,
        )
        await server.start()
        self.servers[name] = server
        return server

    @property
    def client(self) -> Any:
        assert self.manager is not None
        return self.manager.client

    @property
    def monitor(self) -> Any:
        assert self.manager is not None
        return self.manager.admin

    async def create(self, n: int, prefix: str = "job") -> list[str]:
        return [await self.client.create_job(f"{prefix}-{i}", str(i)) for i in range(n)]

    async def job(self, job_id: str) -> JobRecord:
        record: JobRecord = await self.monitor.job(job_id)
        return record

    async def wait_running(self, job_ids: list[str], timeout: float = 10.0) -> None:
        """Every job has exactly one live copy in the ledger."""
        await eventually(
            lambda: all(len(self.ledger.running(j)) == 1 for j in job_ids),
            timeout,
            what="every job running once",
        )

    async def wait_status(self, job_id: str, status: JobStatus, timeout: float = 10.0) -> JobRecord:
        async def check() -> JobRecord | None:
            record = await self.job(job_id)
            return record if record.status is status else None

        result: JobRecord = await eventually(check, timeout, what=f"{job_id} {status}")
        return result

    async def close(self) -> None:
        for server in list(self.servers.values()):
            await server.kill()
        if self.manager is not None:
            await self.manager.stop()
        MemoryBroker.reset(self.broker_name)


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
async def cluster(ledger: Ledger) -> AsyncIterator[Cluster]:
    c = Cluster(f"t-{uuid.uuid4().hex[:12]}", ledger)
    try:
        yield c
    finally:
        await c.close()
