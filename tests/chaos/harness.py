"""Chaos harness: a manager and N ``orchestratr server`` processes on the real
RabbitMQ broker and PostgreSQL, a silent TCP proxy between each server and the
broker, fault injection, a ledger written by the jobs themselves, and a checker
for invariants I1-I6 of ``design-notes.md``.

Every run uses its own RabbitMQ namespace and PostgreSQL schema and removes both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from orchestratr_core import OrchestratorClient
from orchestratr_core.errors import BackendUnavailable, DuplicateJobName
from orchestratr_core.job import JobQuery, JobRecord, JobStatus, ServerQuery, ServerRecord
from orchestratr_core.monitor import AdminOrchestratorMonitor
from orchestratr_core.plugin import get_plugin_manager
from orchestratr_core.storage import Storage
from orchestratr_core.testing.proxy import SilentProxy
from orchestratr_core.transport import Transport
from tests.rabbitmq.conftest import drop_namespace

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
PG_CLUSTER = "15"


@dataclass(frozen=True)
class Timings:
    """The timings a chaos cluster runs with (seconds)."""

    heartbeat_interval: float = 0.5
    """Server -> manager heartbeat."""
    server_timeout: float = 3.0
    """Manager: a server not heard from this long is dead."""
    stop_grace: float = 2.0
    broker_heartbeat: int = 3
    """AMQP heartbeat negotiated with RabbitMQ; the broker drops a silent client
    2 to 3 of these after the last byte it received (6-9 s)."""
    rebalance_interval: float = 2.0
    """Manager: seconds between rebalancing rounds."""
    fence_timeout: float = 4.5
    """Client: give every delivery up after this much silence from the broker —
    strictly less than the broker's earliest detection (2 x broker_heartbeat).
    Not tighter: on a loaded 2-core machine a 1.5 s fence fired falsely."""


class ProxyLoop:
    """Runs the silent proxies on an event loop of their own, in a thread, so that
    nothing the test does on its loop (parsing the ledger, waiting for a process)
    can stall the traffic between the servers and the broker."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def new_proxy(self) -> SilentProxy:
        proxy = SilentProxy()
        self.call(proxy.start())
        return proxy

    def pause(self, proxy: SilentProxy) -> None:
        self.loop.call_soon_threadsafe(proxy.pause)

    def resume(self, proxy: SilentProxy) -> None:
        self.loop.call_soon_threadsafe(proxy.resume)

    def stop(self, proxies: list[SilentProxy]) -> None:
        for proxy in proxies:
            with contextlib.suppress(Exception):
                self.call(proxy.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@dataclass
class Proc:
    """A process of the cluster under test."""

    name: str
    role: str
    popen: subprocess.Popen[bytes]
    log: Path
    killed_at: float | None = None
    frozen_since: float | None = None
    proxy: SilentProxy | None = None
    max_workers: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Copy:
    """One running copy of a job as the ledger shows it."""

    job: str
    name: str
    fence: int
    pid: int
    server: str
    start: float
    stop: float | None = None
    writes: list[float] = field(default_factory=list)

    def last_step(self, dead_at: float | None) -> float:
        """The last moment this copy did something (its start, a write)."""
        last = max([self.start, *self.writes])
        return min(last, dead_at) if dead_at is not None else last


class _UnconfirmedPublishes(logging.Handler):
    """Ids of jobs whose first publish the client could not confirm. The manager's
    relay sends those again; if the broker had stored the first message (its confirm
    lost as the broker shut down), two messages of one generation exist -- the
    documented "Duplicate messages" gap of docs/reliability.md."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.ids: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("job %s created; its message will be sent") and isinstance(
            record.args, tuple
        ):
            self.ids.add(str(record.args[0]))


class ChaosCluster:
    """See the module docstring."""

    def __init__(self, workdir: Path, timings: Timings | None = None) -> None:
        self.workdir = workdir
        self.timings = timings or Timings()
        self.run_id = uuid.uuid4().hex[:10]
        self.namespace = f"chaos-{self.run_id}"
        self.schema = f"chaos_{self.run_id}"
        self.ledger_dir = workdir / "ledger"
        self.ledger_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, Proc] = {}
        self.manager: Proc | None = None
        self._manager_count = 0
        self.storage: Storage | None = None
        self.transport: Transport | None = None
        self.client: OrchestratorClient | None = None
        self.monitor: AdminOrchestratorMonitor | None = None
        self.cancelled_at: dict[str, float] = {}
        self.proxies = ProxyLoop()
        self.unconfirmed = _UnconfirmedPublishes()
        logging.getLogger("orchestratr.client").addHandler(self.unconfirmed)

    # -- URLs -------------------------------------------------------------------------------

    @property
    def storage_url(self) -> str:
        return f"{PG_ADMIN}?schema={self.schema}"

    def transport_url(self, port: int = 5672) -> str:
        t = self.timings
        return (
            f"amqp://guest:guest@127.0.0.1:{port}/?namespace={self.namespace}"
            f"&heartbeat={t.broker_heartbeat}&fence_timeout={t.fence_timeout}"
        )

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the schema, start the manager, connect the test's own client."""
        conn = await asyncpg.connect(PG_ADMIN)
        try:
            await conn.execute(f'CREATE SCHEMA "{self.schema}"')
        finally:
            await conn.close()
        pm = get_plugin_manager()
        self.storage = pm.make_storage(self.storage_url)
        self.transport = pm.make_transport(self.transport_url())
        await self.storage.open()
        await self.transport.connect()
        self.client = OrchestratorClient(self.storage, self.transport)
        self.monitor = AdminOrchestratorMonitor(self.storage)
        await self.start_manager()

    async def close(self) -> None:
        """Kill everything and remove the run's schema and queues."""
        logging.getLogger("orchestratr.client").removeHandler(self.unconfirmed)
        for proc in list(self.procs.values()):
            self._reap(proc)
        if self.manager is not None:
            self._reap(self.manager)
        self.proxies.stop([p.proxy for p in self.procs.values() if p.proxy is not None])
        with contextlib.suppress(Exception):
            if self.transport is not None:
                await self.transport.close()
        with contextlib.suppress(Exception):
            if self.storage is not None:
                await self.storage.close()
        conn = await asyncpg.connect(PG_ADMIN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await conn.close()
        await drop_namespace(self.namespace)

    def _reap(self, proc: Proc) -> None:
        if proc.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                proc.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=10)

    def _spawn(self, name: str, role: str, args: list[str], env: dict[str, str]) -> Proc:
        log = self.workdir / f"{name}.log"
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        popen = subprocess.Popen(
            [sys.executable, "-m", "orchestratr_core.cli", "--log-level", "info", *args],
            cwd=ROOT,
            env=full_env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        return Proc(name=name, role=role, popen=popen, log=log)

    async def start_manager(self) -> Proc:
        """Start a manager process (a new one after a kill)."""
        self._manager_count += 1
        t = self.timings
        proc = self._spawn(
            f"manager-{self._manager_count}",
            "manager",
            [
                "manager",
                "--storage",
                self.storage_url,
                "--transport",
                self.transport_url(),
                "--server-timeout",
                str(t.server_timeout),
                "--rebalance-interval",
                str(t.rebalance_interval),
            ],
            {},
        )
        self.manager = proc
        return proc

    async def add_server(
        self, name: str, max_workers: int = 10, *, job: str = "tests.chaos.jobs:ledger_job"
    ) -> Proc:
        """Start an ``orchestratr server`` process behind its own silent proxy."""
        proxy = self.proxies.new_proxy()
        t = self.timings
        proc = self._spawn(
            name,
            "server",
            [
                "server",
                "--job",
                job,
                "--name",
                name,
                "--max-workers",
                str(max_workers),
                "--transport",
                self.transport_url(proxy.port),
                "--heartbeat-interval",
                str(t.heartbeat_interval),
                "--stop-grace",
                str(t.stop_grace),
            ],
            {"ORCHESTRATR_LEDGER_DIR": str(self.ledger_dir), "ORCHESTRATR_SERVER_LABEL": name},
        )
        proc.proxy = proxy
        proc.max_workers = max_workers
        self.procs[name] = proc
        return proc

    # -- faults ------------------------------------------------------------------------------

    def kill9(self, name: str) -> float:
        """``kill -9`` a server; returns when it happened."""
        proc = self.procs[name]
        proc.killed_at = time.time()
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(timeout=10)  # a killed process is reaped at once
        return proc.killed_at

    async def wait_exit(self, name: str, within: float) -> int:
        """Wait (without blocking the loop) for a process to exit; its status."""
        return await asyncio.to_thread(self.procs[name].popen.wait, within)

    def sigterm(self, name: str) -> float:
        """SIGTERM a server (graceful hand-over)."""
        self.procs[name].popen.send_signal(signal.SIGTERM)
        return time.time()

    def sigstop(self, name: str) -> float:
        proc = self.procs[name]
        proc.frozen_since = time.time()
        proc.popen.send_signal(signal.SIGSTOP)
        return proc.frozen_since

    def sigcont(self, name: str) -> float:
        proc = self.procs[name]
        proc.popen.send_signal(signal.SIGCONT)
        return time.time()

    def partition(self, name: str) -> float:
        proxy = self.procs[name].proxy
        assert proxy is not None
        self.proxies.pause(proxy)
        return time.time()

    def heal(self, name: str) -> float:
        proxy = self.procs[name].proxy
        assert proxy is not None
        self.proxies.resume(proxy)
        return time.time()

    async def cli(self, *args: str) -> str:
        """Run an ``orchestratr`` command against this cluster; its standard output."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "orchestratr_core.cli", *args,
            "--storage", self.storage_url, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise AssertionError(f"orchestratr {' '.join(args)} failed: {err.decode()}")
        return out.decode()

    def kill_manager(self) -> float:
        assert self.manager is not None
        self.manager.killed_at = time.time()
        self.manager.popen.kill()
        self.manager.popen.wait(timeout=10)
        return self.manager.killed_at

    async def restart_broker(self) -> tuple[float, float]:
        """``rabbitmqctl stop_app`` then ``start_app``: (stopped at, back up at)."""
        await _run("rabbitmqctl", "stop_app")
        down = time.time()
        await _run("rabbitmqctl", "start_app")
        up = time.time()
        await _run("rabbitmqctl", "await_startup")
        return down, up

    async def restart_postgres(self) -> float:
        """Restart the PostgreSQL cluster (fast shutdown: connections drop)."""
        cluster = PG_CLUSTER
        with contextlib.suppress(OSError, IndexError):
            cluster = sorted(os.listdir("/etc/postgresql"))[0]
        await _run("pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "restart")
        return time.time()

    # -- jobs --------------------------------------------------------------------------------

    async def create(self, n: int, prefix: str = "job") -> list[str]:
        """Create jobs the way an application would: a create that fails with
        BackendUnavailable (the database is restarting) is retried; one whose
        commit went through before the connection dropped is found by name."""
        return [await self._create_one(f"{prefix}-{i}", str(i)) for i in range(n)]

    async def _create_one(self, name: str, argument: str) -> str:
        assert self.client is not None and self.monitor is not None
        deadline = time.time() + 30
        retried = False
        while True:
            try:
                return await self.client.create_job(name, argument)
            except BackendUnavailable:
                if time.time() > deadline:
                    raise
                retried = True
                await asyncio.sleep(0.5)
            except DuplicateJobName:
                if not retried:
                    raise
                jobs = await self.monitor.all_jobs(JobQuery(name_prefix=name))
                return next(j.id for j in jobs if j.name == name)

    async def cancel(self, job_id: str) -> None:
        assert self.client is not None
        deadline = time.time() + 30
        while True:
            try:
                await self.client.mark_on_deleting(job_id)
                break
            except BackendUnavailable:
                if time.time() > deadline:
                    raise
                await asyncio.sleep(0.5)
        self.cancelled_at[job_id] = time.time()

    async def jobs(self) -> list[JobRecord]:
        assert self.monitor is not None
        return await self.monitor.all_jobs(JobQuery(include_deleted=True, limit=None))

    async def servers(self) -> list[ServerRecord]:
        assert self.monitor is not None
        return await self.monitor.servers(ServerQuery(statuses=None))

    # -- the ledger ------------------------------------------------------------------------------

    def copies(self) -> list[Copy]:
        """Every copy of every job the ledger files record."""
        out: list[Copy] = []
        current: dict[tuple[int, str], Copy] = {}
        for path in sorted(self.ledger_dir.glob("*.jsonl")):
            for raw in path.read_text(encoding="utf-8").splitlines():
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue  # the last line, still being written

                key = (line["pid"], line["job"])
                if line["e"] == "start":
                    copy = Copy(
                        line["job"],
                        line["name"],
                        line["fence"],
                        line["pid"],
                        line["server"],
                        line["t"],
                    )
                    current[key] = copy
                    out.append(copy)
                elif line["e"] == "write" and key in current:
                    current[key].writes.append(line["t"])
                elif line["e"] == "stop" and key in current:
                    current[key].stop = line["t"]
                    del current[key]
        return out

    def dead_at(self, pid: int) -> float | None:
        for proc in self.procs.values():
            if proc.pid == pid:
                return proc.killed_at
        return None

    def live_copies(
        self, within: float = 1.0, *, exclude: tuple[str, ...] = (), after: float | None = None
    ) -> list[Copy]:
        """Copies that wrote within the last ``within`` seconds and have not
        stopped, leaving out those on ``exclude`` servers or started before ``after``."""
        now = time.time()
        return [
            c
            for c in self.copies()
            if c.stop is None
            and self.dead_at(c.pid) is None
            and max([c.start, *c.writes]) >= now - within
            and c.server not in exclude
            and (after is None or c.start >= after)
        ]

    async def wait_all_running(
        self,
        job_ids: list[str],
        within: float,
        *,
        exclude: tuple[str, ...] = (),
        after: float | None = None,
    ) -> float:
        """Wait until each job has exactly one live copy (not on ``exclude``
        servers, started after ``after`` when given); the seconds it took."""
        t0 = time.time()
        wanted = set(job_ids)
        while True:
            live: dict[str, int] = {}
            for c in self.live_copies(exclude=exclude, after=after):
                live[c.job] = live.get(c.job, 0) + 1
            if all(live.get(j) == 1 for j in wanted):
                return time.time() - t0
            if time.time() - t0 > within:
                missing = sorted(j for j in wanted if live.get(j) != 1)
                raise AssertionError(
                    f"{len(missing)} job(s) not running exactly once after {within} s: "
                    f"{missing[:5]} ({self.tail_logs()})"
                )
            await asyncio.sleep(0.1)

    def tail_logs(self, lines: int = 15) -> str:
        out = []
        for proc in [*self.procs.values(), *([self.manager] if self.manager else [])]:
            text = proc.log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {proc.name} ---\n" + "\n".join(text))
        return "\n".join(out)

    # -- the checker ---------------------------------------------------------------------------

    def check(self) -> Report:
        """Check I1, I3 and I6 over the whole ledger."""
        copies = self.copies()
        report = Report()
        by_job: dict[str, list[Copy]] = {}
        for c in copies:
            by_job.setdefault(c.job, []).append(c)
        for job, cs in by_job.items():
            cs.sort(key=lambda c: c.start)
            for i, a in enumerate(cs):
                a_end = a.last_step(self.dead_at(a.pid))
                for b in cs[i + 1 :]:
                    if b.pid == a.pid:
                        continue
                    if job in self.unconfirmed.ids and a.fence != b.fence and b.start < a_end:
                        # Two messages of the job (one relayed after an unconfirmed
                        # publish) ran two copies: downstream refuses the lower
                        # token's writes, and the manager must stop that copy.
                        low = a if a.fence < b.fence else b
                        low_end = low.stop if low.stop is not None else time.time()
                        report.duplicate_copies.append((job, low.server, low_end - b.start))
                        continue
                    if b.start < a_end:
                        report.overlaps.append((job, a.server, b.server, a_end - b.start))
                    if b.fence <= a.fence:
                        report.fence_regressions.append((job, a.fence, b.fence))
                    stale = [w for w in a.writes if w > b.start]
                    if stale and a.fence >= b.fence:
                        report.unfenced_stale_writes += len(stale)
                    report.stale_writes += len(stale)
            cancelled = self.cancelled_at.get(job)
            if cancelled is not None:
                for c in cs:
                    if c.start > cancelled + 0.001:
                        end = c.stop if c.stop is not None else time.time()
                        report.ran_after_cancel.append((job, c.server, end - c.start))
        # I6: concurrent copies per server never above its max_workers
        for name, proc in self.procs.items():
            events: list[tuple[float, int]] = []
            for c in copies:
                if c.server != name:
                    continue
                events.append((c.start, 1))
                events.append((c.stop if c.stop is not None else time.time(), -1))
            running = peak = 0
            for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
                running += delta
                peak = max(peak, running)
            if peak > proc.max_workers:
                report.over_capacity.append((name, peak, proc.max_workers))
        return report

    async def view_matches_ledger(self, job_ids: list[str]) -> list[str]:
        """I4: jobs whose manager view (status/server) disagrees with the ledger."""
        live = {c.job: c for c in self.live_copies()}
        servers = {s.id: s.name for s in await self.servers()}
        wrong = []
        for job in await self.jobs():
            if job.id not in job_ids:
                continue
            copy = live.get(job.id)
            if copy is None:
                if job.status is JobStatus.PROCESSING:
                    wrong.append(f"{job.name}: view says processing, ledger: not running")
                continue
            if job.status is not JobStatus.PROCESSING or servers.get(job.server_id or "") != (
                copy.server
            ):
                wrong.append(
                    f"{job.name}: view {job.status.value} on "
                    f"{servers.get(job.server_id or '')}, ledger on {copy.server}"
                )
        return wrong

    async def wait_view_converges(self, job_ids: list[str], within: float) -> float:
        t0 = time.time()
        while True:
            wrong = await self.view_matches_ledger(job_ids)
            if not wrong:
                return time.time() - t0
            if time.time() - t0 > within:
                raise AssertionError(f"manager view wrong after {within} s: {wrong[:5]}")
            await asyncio.sleep(0.2)


@dataclass
class Report:
    """What the checker found."""

    overlaps: list[tuple[str, str, str, float]] = field(default_factory=list)
    fence_regressions: list[tuple[str, int, int]] = field(default_factory=list)
    stale_writes: int = 0
    unfenced_stale_writes: int = 0
    ran_after_cancel: list[tuple[str, str, float]] = field(default_factory=list)
    over_capacity: list[tuple[str, int, int]] = field(default_factory=list)
    duplicate_copies: list[tuple[str, str, float]] = field(default_factory=list)
    """Two copies run by two messages of one job: (job, server of the lower token,
    seconds both ran)."""

    def assert_ok(self, *, cancel_grace: float = 0.0, duplicate_grace: float = 0.0) -> None:
        """No invariant violated. ``cancel_grace``: a copy of a cancelled job that
        started after the cancel is tolerated only if it ran no longer than this
        (the documented window of a cancel issued while the broker is down).
        ``duplicate_grace``: two copies run by two messages of a job whose first
        publish was not confirmed (docs/reliability.md) are tolerated only if the
        lower token's copy stopped within this many seconds."""
        problems = {
            "duplicate message's copies overlapped too long": [
                d for d in self.duplicate_copies if d[2] > duplicate_grace
            ],
            "I1 overlapping copies": self.overlaps,
            "fencing token did not grow": self.fence_regressions,
            "stale writes with a token not lower than the owner's": self.unfenced_stale_writes,
            "I3 ran after cancel": [r for r in self.ran_after_cancel if r[2] > cancel_grace],
            "I6 over capacity": self.over_capacity,
        }
        bad = {k: v for k, v in problems.items() if v}
        assert not bad, f"invariants violated: {bad}"


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {out.decode(errors='replace')[-500:]}")


def seeded(seed: int | None = None) -> tuple[random.Random, int]:
    """A seeded random generator for soak tests; prints the seed."""
    value = seed if seed is not None else int(os.environ.get("CHAOS_SEED", time.time_ns() % 10**9))
    print(f"chaos seed: {value} (CHAOS_SEED={value} reproduces it)")
    return random.Random(value), value
