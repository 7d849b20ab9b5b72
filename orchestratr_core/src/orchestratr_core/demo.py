"""``orchestratr demo``: the whole system in one process, with no services.

A manager (storage: a SQLite file, or whatever ``--storage`` names), servers on
the in-memory transport and 30 ticker jobs. The demo starts two servers and
creates the jobs; a third server joins and rebalancing hands it its share; then
it kills one server the way ``kill -9`` would and shows its jobs running again on
the survivors with larger fencing tokens, cancels one job and shows that it is
deleted and never runs again, waits for the manager to declare the killed server
dead, and shuts everything down with a summary. It ends by itself well within 30
seconds; ``--forever`` keeps it running (with a fleet view every few seconds)
until Ctrl-C.

The demo's own job function wraps :func:`orchestratr_core.examples.ticker` and
records every start and stop, so the summary speaks about what really ran, not
only about what the manager believes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from orchestratr_core.backend_urls import sqlite_url
from orchestratr_core.errors import MissingDriver, PluginNotFound
from orchestratr_core.examples import ticker
from orchestratr_core.job import (
    JobArgument,
    JobQuery,
    JobStatus,
    ServerQuery,
    ServerStatus,
    split_fence,
)
from orchestratr_core.lifecycle import checkpointed
from orchestratr_core.manager import ManagerOptions, ServerManager
from orchestratr_core.plugin.manager import get_plugin_manager, mask_url
from orchestratr_core.runner import Heartbeat, StopToken
from orchestratr_core.server import OrchestratedServer, ServerOptions
from orchestratr_core.storage import Storage

__all__ = ["DEMO_SQLITE_FILE", "DemoLedger", "run_demo"]

DEMO_SQLITE_FILE = "orchestratr-demo.sqlite3"
"""The demo's default storage, made anew in the working directory on every run."""

TRANSPORT = "memory://demo"
SERVER_NAMES = ("server-a", "server-b", "server-c")
MAX_WORKERS = 16
"""Per server: 3 x 16 = 48 slots for 30 jobs, and 2 x 16 = 32 after one server dies."""
JOB_COUNT = 30
TICK_SECONDS = "0.5"
SERVER_OPTIONS = ServerOptions(heartbeat_interval=1.0, stop_grace=2.0)
MANAGER_OPTIONS = ManagerOptions(
    server_timeout=3.0,
    sweep_interval=0.5,
    leader_lease=2.0,
    rebalance_interval=1.0,
    rebalance_hold=1.0,
)
"""Shorter than the defaults so that the demo shows rebalancing and dead-server
detection within seconds."""
WAIT_LIMIT = 8.0
"""The longest the demo waits for any one thing before it calls it a failure."""
POLL = 0.05


@dataclass
class _Run:
    """One run of a job function on one server, as the job itself saw it."""

    server: str
    fence: int
    started: float
    stopped: float | None = None
    checkpoint: str | None = None
    """The checkpoint this run started with (``arg.checkpoint``)."""
    argument: str = ""
    """The job argument this run started with (an update restarts it with another)."""


@dataclass
class DemoLedger:
    """What the demo's job functions really did: every start and stop, per job."""

    runs: dict[str, list[_Run]] = field(default_factory=dict)
    ticks: int = 0
    max_copies: int = 0
    """The most copies of one job that ever ran at the same moment: 1 by the one-runner
    invariant (I1 in docs/architecture.md)."""

    def job_function(
        self, server: str
    ) -> Callable[[JobArgument, StopToken, Heartbeat], Awaitable[None]]:
        """The job function for the server labelled ``server``."""

        async def demo_job(arg: JobArgument, token: StopToken, heartbeat: Heartbeat) -> None:
            run = _Run(
                server=server,
                fence=arg.fence,
                started=time.monotonic(),
                checkpoint=arg.checkpoint,
                argument=arg.argument,
            )
            runs = self.runs.setdefault(arg.job_id, [])
            runs.append(run)
            self.max_copies = max(self.max_copies, sum(1 for r in runs if r.stopped is None))

            def beat(checkpoint: str | None = None) -> None:
                self.ticks += 1
                heartbeat(checkpoint)

            try:
                await ticker(arg, token, beat)
            finally:
                run.stopped = time.monotonic()

        return checkpointed(demo_job)

    def running_on(self, job_id: str) -> list[str]:
        """The servers on which the job's function is running now."""
        return [r.server for r in self.runs.get(job_id, []) if r.stopped is None]

    def started_after(self, job_id: str, moment: float) -> bool:
        """True if the job's function was started after ``moment`` (monotonic)."""
        return any(r.started > moment for r in self.runs.get(job_id, []))


def _secs(seconds: float) -> str:
    """A duration for people: milliseconds below one second."""
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


class _Out:
    """Readable output: a line at a time, flushed, with the time since the start."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def line(self, text: str = "") -> None:
        print(text, file=self._stream, flush=True)

    def step(self, text: str) -> None:
        self.line(f"\n[{self.elapsed():5.1f}s] {text}")

    def ok(self, text: str) -> None:
        self.line(f"         ok  {text}")

    def fail(self, text: str) -> None:
        self.line(f"       FAIL  {text}")


class _Demo:
    def __init__(self, storage: Storage | str, out: _Out) -> None:
        self.storage = storage
        self.out = out
        self.ledger = DemoLedger()
        self.manager: ServerManager | None = None
        self.servers: dict[str, OrchestratedServer] = {}
        self.dead: set[str] = set()
        self.job_ids: dict[str, str] = {}  # job id -> name
        self.summary: list[str] = []
        self.killed: tuple[str, float] | None = None  # server id, monotonic time of the kill
        self.failures: list[str] = []

    # -- helpers ---------------------------------------------------------------------

    @property
    def mgr(self) -> ServerManager:
        """The running manager."""
        if self.manager is None:
            raise RuntimeError("the demo's manager has not been started")
        return self.manager

    def _label_of(self, server_id: str | None) -> str:
        for label, server in self.servers.items():
            if server.id == server_id:
                return label
        return "?" if server_id is None else server_id[:8]

    async def _until(
        self, check: Callable[[], Awaitable[bool]], limit: float = WAIT_LIMIT
    ) -> float:
        """Poll ``check`` until it holds; the seconds it took, or -1 on time-out."""
        start = time.monotonic()
        while True:
            if await check():
                return time.monotonic() - start
            if time.monotonic() - start > limit:
                return -1.0
            await asyncio.sleep(POLL)

    def _fail(self, text: str) -> None:
        self.failures.append(text)
        self.out.fail(text)

    async def show_fleet(self) -> None:
        """One line per server: what really runs there, and what the manager sees."""
        seen = {
            s.id: len(s.running) for s in await self.mgr.monitor.servers(ServerQuery(statuses=None))
        }
        for label, server in self.servers.items():
            if label in self.dead:
                count = 0
                state = "killed"
            else:
                count = len(server.running())
                state = "alive"
            bar = "#" * count + "." * (MAX_WORKERS - count)
            view = seen.get(server.id, 0)
            self.out.line(
                f"    {label}  [{bar}] {count:2d}/{MAX_WORKERS} running  "
                f"(manager sees {view:2d})  {state}"
            )
        if self.ledger.ticks:
            self.out.line(f"    {self.ledger.ticks} ticks so far from all jobs")

    async def _processing_total(self) -> int:
        page = await self.mgr.monitor.jobs(
            JobQuery(statuses=frozenset({JobStatus.PROCESSING}), limit=1), with_total=True
        )
        return page.total or 0

    # -- the script --------------------------------------------------------------------

    async def start(self) -> None:
        self.out.step("Starting a manager and two servers in this process")
        self.manager = ServerManager(
            storage=self.storage, transport=TRANSPORT, options=MANAGER_OPTIONS
        )
        await self.mgr.start()
        for label in SERVER_NAMES[:-1]:
            self.servers[label] = self._server(label)
        await asyncio.gather(*(s.start() for s in self.servers.values()))
        for label, server in self.servers.items():
            self.out.line(f"    {label}: id {server.id}, up to {MAX_WORKERS} jobs")

    def _server(self, label: str) -> OrchestratedServer:
        return OrchestratedServer(
            self.ledger.job_function(label),
            transport=TRANSPORT,
            name=label,
            max_workers=MAX_WORKERS,
            options=SERVER_OPTIONS,
        )

    async def join_one(self) -> None:
        """Start one more server and watch rebalancing give it its share."""
        label = SERVER_NAMES[-1]
        self.out.step(f"A new server joins: {label}; rebalancing hands it its share of the jobs")
        t0 = time.monotonic()
        server = self._server(label)
        self.servers[label] = server
        await server.start()
        self.out.line(f"    {label}: id {server.id}, up to {MAX_WORKERS} jobs")
        live = list(self.servers.values())
        share = JOB_COUNT / len(live)

        async def balanced() -> bool:
            counts = [len(s.running()) for s in live]
            return sum(counts) == JOB_COUNT and all(abs(c - share) <= 1 for c in counts)

        took = await self._until(balanced, limit=3 * WAIT_LIMIT)
        if took < 0:
            self._fail(f"the jobs were not spread over {len(live)} servers")
        else:
            took = time.monotonic() - t0
            got = len(server.running())
            self.out.ok(f"{label} runs {got} jobs {_secs(took)} after it started; none was lost")
            moved_twice = [
                j for j, runs in self.ledger.runs.items() if len({r.server for r in runs}) > 2
            ]
            if moved_twice:
                self._fail(f"{len(moved_twice)} jobs moved more than once")
            else:
                self.out.ok("only the surplus moved, each job at most once")
            self.summary.append(f"{label} joined and got {got} jobs in {_secs(took)} (rebalancing)")
        await self.show_fleet()
        # After a round every server caps itself at its share for a moment (lifted
        # at its next heartbeat); let that pass before the next act.
        await asyncio.sleep(
            MANAGER_OPTIONS.rebalance_hold + SERVER_OPTIONS.heartbeat_interval + 0.3
        )

    async def create_jobs(self, tag: str) -> None:
        self.out.step(f"Creating {JOB_COUNT} ticker jobs through the client")
        t0 = time.monotonic()
        for i in range(1, JOB_COUNT + 1):
            name = f"ticker-{tag}{i:02d}"
            job_id = await self.mgr.client.create_job(name, TICK_SECONDS)
            self.job_ids[job_id] = name
        names = list(self.job_ids.values())
        self.out.line(f"    created {names[0]} .. {names[-1]}")

        async def all_running() -> bool:
            return await self._processing_total() >= JOB_COUNT

        took = await self._until(all_running)
        if took < 0:
            self._fail(f"only {await self._processing_total()} of {JOB_COUNT} jobs running")
        else:
            took = time.monotonic() - t0
            self.out.ok(f"all {JOB_COUNT} jobs running {_secs(took)} after the first create")
            self.summary.append(f"{JOB_COUNT} jobs created and running in {_secs(took)}")
        await self.show_fleet()

    async def kill_one(self) -> None:
        label = max(self.servers, key=lambda n: len(self.servers[n].running()))
        victim = self.servers[label]
        moved = set(victim.running())
        fences = {job_id: arg.fence for job_id, arg in victim.running().items()}
        self.out.step(f"Killing {label} abruptly (like kill -9) while it runs {len(moved)} jobs")
        t0 = time.monotonic()
        await victim.kill()
        self.killed = (victim.id, t0)
        self.dead.add(label)
        survivors = [s for n, s in self.servers.items() if n not in self.dead]

        async def really_moved() -> bool:
            running = set().union(*(s.running() for s in survivors))
            return moved <= running

        took = await self._until(really_moved)
        if took < 0:
            self._fail(f"the jobs of {label} did not all start on the survivors")
            return
        self.out.ok(
            f"all {len(moved)} jobs of {label} running on the survivors after {_secs(took)}"
        )

        survivor_ids = {s.id for s in survivors}

        async def manager_agrees() -> bool:
            jobs = await self.mgr.admin.all_jobs(JobQuery(limit=None))
            return all(
                j.status is JobStatus.PROCESSING and j.server_id in survivor_ids
                for j in jobs
                if j.id in moved
            )

        seen = await self._until(manager_agrees)
        if seen < 0:
            self._fail("the manager's view did not catch up with the move")
        else:
            seen = time.monotonic() - t0
            self.out.ok(f"the manager's view agreed {_secs(seen)} after the kill")
        grew = all(
            max(r.fence for r in self.ledger.runs[j] if r.server != label) > fences[j]
            for j in moved
        )
        if grew:
            self.out.ok("every moved job got a larger fencing token than its dead owner had")
        else:
            self._fail("a moved job did not get a larger fencing token")
        resumed = [
            run.checkpoint
            for j in moved
            for run in self.ledger.runs[j][-1:]
            if run.server != label and run.checkpoint is not None
        ]
        if resumed:
            self.out.ok(
                f"{len(resumed)} of {len(moved)} moved jobs went on counting from the checkpoint "
                f"their dead owner last sent (e.g. from tick {resumed[0]})"
            )
        else:
            self._fail("no moved job started from its checkpoint")
        self.summary.append(
            f"{label} killed with {len(moved)} jobs: running on the survivors after "
            f"{_secs(took)}" + (f", manager's view right after {_secs(seen)}" if seen >= 0 else "")
        )
        await self.show_fleet()

    async def cancel_one(self) -> None:
        live = [s for n, s in self.servers.items() if n not in self.dead]
        job_id = sorted(live[0].running())[0] if live and live[0].running() else ""
        if not job_id:
            self._fail("no running job to cancel")
            return
        name = self.job_ids.get(job_id, job_id)
        where = self.ledger.running_on(job_id)
        self.out.step(f"Cancelling {name} (running on {', '.join(where) or '?'})")
        t0 = time.monotonic()
        await self.mgr.client.mark_on_deleting(job_id)

        async def deleted() -> bool:
            return (await self.mgr.monitor.job(job_id)).status is JobStatus.DELETED

        took = await self._until(deleted)
        if took < 0:
            status = (await self.mgr.monitor.job(job_id)).status.value
            self._fail(f"{name} is still {status}, not deleted")
            return
        if self.ledger.running_on(job_id):
            self._fail(f"{name} is deleted but its job function is still running")
        else:
            self.out.ok(f"{name} deleted after {_secs(took)}; its job function has returned")
        await asyncio.sleep(1.5)  # give a buggy system the chance to start it again
        again = self.ledger.started_after(job_id, t0) or bool(self.ledger.running_on(job_id))
        if again:
            self._fail(f"{name} ran again after it was cancelled")
        else:
            self.out.ok(f"{name} did not run again (watched for 1.5s)")
        self.summary.append(f"{name} cancelled: deleted after {_secs(took)}, never ran again")

    async def pause_and_resume_one(self) -> None:
        live = [s for n, s in self.servers.items() if n not in self.dead]
        job_id = sorted(live[-1].running())[0] if live and live[-1].running() else ""
        if not job_id:
            self._fail("no running job to pause")
            return
        name = self.job_ids.get(job_id, job_id)
        self.out.step(f"Pausing {name} (running on {', '.join(self.ledger.running_on(job_id))})")
        await self.mgr.client.pause(job_id)

        async def paused() -> bool:
            record = await self.mgr.monitor.job(job_id)
            return record.status is JobStatus.PAUSED and not self.ledger.running_on(job_id)

        took = await self._until(paused)
        if took < 0:
            self._fail(f"{name} did not pause")
            return
        t0 = time.monotonic()
        await asyncio.sleep(1.0)
        if self.ledger.started_after(job_id, t0):
            self._fail(f"{name} ran while paused")
            return
        self.out.ok(f"{name} paused after {_secs(took)}; nothing ran it for 1.0s")
        checkpoint = (await self.mgr.monitor.job(job_id)).checkpoint
        await self.mgr.client.resume(job_id)

        async def running_again() -> bool:
            return bool(self.ledger.running_on(job_id))

        again = await self._until(running_again)
        if again < 0:
            self._fail(f"{name} did not run again after resume")
            return
        start = self.ledger.runs[job_id][-1].checkpoint
        self.out.ok(
            f"{name} resumed: running again after {_secs(again)}, from tick {start} "
            f"(its last checkpoint: {checkpoint})"
        )
        self.summary.append(f"{name} paused and resumed, counting on from tick {start}")

    async def update_one(self) -> None:
        """Update a running job's argument (its tick interval): it restarts with it,
        once, never two copies."""
        live = [s for n, s in self.servers.items() if n not in self.dead]
        job_id = sorted(live[0].running())[0] if live and live[0].running() else ""
        if not job_id:
            self._fail("no running job to update")
            return
        name = self.job_ids.get(job_id, job_id)
        self.out.step(f"Updating the argument of {name} (its tick interval) to 0.2")
        t0 = time.monotonic()
        await self.mgr.client.update(job_id, "0.2")

        async def restarted() -> bool:
            return [r.argument for r in self.ledger.runs.get(job_id, []) if r.stopped is None] == [
                "0.2"
            ]

        took = await self._until(restarted)
        if took < 0:
            self._fail(f"{name} did not restart with its new argument")
            return
        after = [r for r in self.ledger.runs[job_id] if r.started > t0]
        if len(after) != 1:
            self._fail(f"{name} started {len(after)} times after its update")
            return
        self.out.ok(
            f"{name} restarted with argument 0.2 after {_secs(took)} (one new copy, "
            f"on {after[0].server}, fence {split_fence(after[0].fence)[0]}:"
            f"{split_fence(after[0].fence)[1]})"
        )
        self.summary.append(f"{name} updated: restarted once with its new argument")

    async def dead_detected(self) -> None:
        """Wait for the manager to declare the killed server dead (missed heartbeats)."""
        if self.killed is None or self.manager is None:
            return
        server_id, t0 = self.killed
        label = self._label_of(server_id)
        timeout = MANAGER_OPTIONS.server_timeout
        self.out.step(f"Waiting for the manager to notice that {label} stopped sending heartbeats")
        self.out.line(f"    (a server not heard from for {timeout:g}s is dead; default 10s)")

        async def dead() -> bool:
            server = await self.mgr.monitor.server(server_id)
            return server.status is ServerStatus.DEAD

        took = await self._until(dead, limit=timeout + WAIT_LIMIT)
        if took < 0:
            self._fail(f"the manager did not declare {label} dead")
            return
        after = time.monotonic() - t0
        self.out.ok(f"{label} declared dead {_secs(after)} after the kill")
        self.summary.append(f"{label} declared dead by the manager {_secs(after)} after the kill")
        live = [s for n, s in self.servers.items() if n not in self.dead]
        expected = len(self.job_ids) - 1  # all but the cancelled one

        async def all_running() -> bool:
            return sum(len(s.running()) for s in live) == expected

        if await self._until(all_running) < 0:
            running = sum(len(s.running()) for s in live)
            self._fail(f"only {running} of the {expected} jobs not cancelled are running")
        else:
            self.out.ok(f"all {expected} jobs that were not cancelled are running")
        await self.show_fleet()

    async def kinds_and_labels(self, tag: str) -> None:
        """Job kinds and labels: a server that runs another kind, with a label, joins;
        jobs of that kind run only there, one only because of its label, and one whose
        constraint no live server satisfies waits and says why."""
        label = "server-eu"
        self.out.step(f"Job kinds and labels: {label} runs kind 'report' and has region=eu")
        server = OrchestratedServer(
            {"report": self.ledger.job_function(label)},
            transport=TRANSPORT,
            name=label,
            max_workers=MAX_WORKERS,
            options=SERVER_OPTIONS,
            labels={"region": "eu"},
        )
        self.servers[label] = server
        await server.start()
        create = self.mgr.client.create_job
        anywhere = await create(f"report-{tag}any", TICK_SECONDS, kind="report")
        eu = await create(f"report-{tag}eu", TICK_SECONDS, kind="report", require=["region=eu"])
        us = await create(f"report-{tag}us", TICK_SECONDS, kind="report", require=["region=us"])
        self.out.line(
            "    created report-any (kind report), report-eu (region=eu), report-us (region=us)"
        )

        async def placed() -> bool:
            return all(self.ledger.running_on(j) == [label] for j in (anywhere, eu))

        took = await self._until(placed)
        if took < 0:
            self._fail("the 'report' jobs did not start on the server that runs that kind")
        else:
            self.out.ok(f"report-any and report-eu run on {label} only, after {_secs(took)}")

        async def waits() -> bool:
            return (await self.mgr.monitor.job(us)).pending_reason is not None

        if await self._until(waits) < 0 or self.ledger.runs.get(us):
            self._fail("report-us did not wait for a server in region us")
            return
        reason = (await self.mgr.monitor.job(us)).pending_reason
        self.out.ok(f"report-us is pending: {reason}")
        self.summary.append(f"kind 'report' ran only on {label}; report-us: {reason}")
        await self.show_fleet()

    async def forever(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
        self.out.step("Running until Ctrl-C (a fleet view every 5 seconds)")
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=5)
                if not stop.is_set():
                    self.out.line(f"  at {self.out.elapsed():.0f}s:")
                    await self.show_fleet()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(signum)

    async def shutdown(self) -> None:
        self.out.step("Shutting down: servers hand their jobs back, then the manager stops")
        t0 = time.monotonic()
        live = [s for n, s in self.servers.items() if n not in self.dead]
        await asyncio.gather(*(s.stop() for s in live), return_exceptions=True)
        still = sum(len(self.ledger.running_on(j)) for j in self.job_ids)
        took = time.monotonic() - t0
        if still:
            self._fail(f"{still} job functions still running after the servers stopped")
        else:
            self.out.ok(f"servers stopped in {_secs(took)}; no job function is left running")
        if self.manager is None:
            return
        manager = self.manager

        async def recorded() -> bool:
            # The servers' goodbyes are events: wait until the manager applied them.
            jobs = await manager.admin.all_jobs(
                JobQuery(statuses=frozenset({JobStatus.PROCESSING}))
            )
            return not any(j.id in self.job_ids for j in jobs)

        seen = await self._until(recorded)
        if seen < 0:
            self._fail("the manager still records jobs as running after the servers left")
        else:
            self.out.ok(f"the manager recorded the hand-over {_secs(seen)} later")
        counts: dict[str, int] = {}
        for job in await manager.admin.all_jobs(JobQuery(include_deleted=True, limit=None)):
            if job.id in self.job_ids:
                counts[job.status.value] = counts.get(job.status.value, 0) + 1
        await manager.stop()
        states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        self.out.line(f"    jobs in the storage now: {states or 'none'}")
        self.out.line("    (pending jobs were handed back: the next server to start takes them)")
        took = time.monotonic() - t0
        self.summary.append(f"clean shutdown in {_secs(took)}; jobs in the storage: {states}")

    async def emergency_stop(self) -> None:
        """Best effort after a failure: stop whatever is still running."""
        for label, server in self.servers.items():
            if label not in self.dead:
                with contextlib.suppress(Exception):
                    await server.stop()
        if self.manager is not None:
            with contextlib.suppress(Exception):
                await self.mgr.stop()


def _choose_storage(storage: str | None, out: _Out) -> tuple[Storage | str, str]:
    """The storage to use and a tag that keeps the demo's job names unique in it."""
    if storage is not None:
        out.line(f"storage:   {mask_url(storage)} (given)")
        fresh = storage.split(":", 1)[0] == "memory"
        return storage, "" if fresh else f"{os.urandom(2).hex()}-"
    path = Path.cwd() / DEMO_SQLITE_FILE
    try:
        # Built here, not opened, to learn at once whether the plugin and its
        # driver are installed: `make demo` installs them, a bare core does not.
        built = get_plugin_manager().make_storage(sqlite_url(path))
    except (PluginNotFound, MissingDriver) as exc:
        out.line(f"storage:   memory (the SQLite storage is not usable here: {exc})")
        return "memory", ""
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()
    out.line(f"storage:   SQLite file {path} (made anew for this run)")
    return built, ""


async def run_demo(
    *, storage: str | None = None, forever: bool = False, stream: TextIO | None = None
) -> int:
    """Run the demo; return the exit status (0 when everything it showed held).

    :param storage: a storage plugin name or URL; ``None`` means a fresh SQLite
        file ``./orchestratr-demo.sqlite3`` (or memory if the SQLite plugin is
        not installed).
    :param forever: keep running after the script until SIGINT or SIGTERM.
    :param stream: where to write (standard output by default).
    """
    out = _Out(stream or sys.stdout)
    out.line("OrchestratR demo: one manager, four servers, two job kinds, one process, no services")
    chosen, tag = _choose_storage(storage, out)
    out.line(f"transport: {TRANSPORT} (in-memory broker)")
    demo = _Demo(chosen, out)
    try:
        await demo.start()
        await demo.create_jobs(tag)
        await asyncio.sleep(1.0)  # let the jobs tick for a moment
        await demo.join_one()
        await demo.kill_one()
        await demo.cancel_one()
        await demo.pause_and_resume_one()
        await demo.update_one()
        await demo.dead_detected()
        await demo.kinds_and_labels(tag)
        if forever:
            await demo.forever()
        await demo.shutdown()
    except BaseException:
        await asyncio.shield(demo.emergency_stop())
        raise
    copies = demo.ledger.max_copies
    if copies > 1:
        demo._fail(f"a job ran as {copies} copies at once")
    out.line("\nSummary")
    for line in demo.summary:
        out.line(f"  - {line}")
    out.line(f"  - at most {copies} copy of any job ran at any moment (invariant I1)")
    out.line(f"  - {demo.ledger.ticks} ticks in {out.elapsed():.1f}s in all")
    if demo.failures:
        out.line(f"\nThe demo saw {len(demo.failures)} problem(s):")
        for text in demo.failures:
            out.line(f"  ! {text}")
        return 1
    if storage is None and not isinstance(chosen, str):
        out.line(
            f"\nSee what it left: orchestratr jobs list --include-deleted "
            f"--storage {sqlite_url(Path.cwd() / DEMO_SQLITE_FILE)}"
        )
    return 0
