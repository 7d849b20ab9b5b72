# Over 600 lines: the one harness (processes, proxies, faults, ledger, figures) chaos tests drive.
"""Chaos harness: a manager and N ``orchestratr server`` processes on the real
RabbitMQ broker and PostgreSQL, a silent TCP proxy between each server and the
broker, fault injection, a ledger written by the jobs themselves, and the facts
the checker (``checker.py``) needs to judge invariants I1-I6 of ``design-notes.md``.
Every figure a test measures is appended to ``benchmarks/results/chaos-runs.jsonl``
(git-ignored); ``make chaos-record`` records into the tracked ``chaos.json`` instead.

Every run uses its own RabbitMQ namespace and PostgreSQL schema and removes both.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from benchmarks.chaos_report import dump_results
from orchestratr_core import OrchestratorClient
from orchestratr_core.errors import BackendUnavailable, DuplicateJobName, PublishError
from orchestratr_core.job import JobQuery, JobRecord, JobStatus, ServerQuery, ServerRecord
from orchestratr_core.monitor import AdminOrchestratorMonitor
from orchestratr_core.placement import Pool
from orchestratr_core.plugin import get_plugin_manager
from orchestratr_core.storage import Storage
from orchestratr_core.testing.proxy import SilentProxy
from orchestratr_core.transport import Transport
from tests.chaos import checker
from tests.chaos.checker import Copy, Report
from tests.support.rabbitmq import BROKER_URL, broker_address, drop_namespace, rabbitmqctl
from tests.support.sql import PG_DATABASE, PG_SERVER

__all__ = ["ChaosCluster", "Copy", "Report", "Timings", "seeded"]

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN = f"{PG_SERVER}/{PG_DATABASE}"
"""The test database (``ORCHESTRATR_TEST_PG``, as every PostgreSQL test)."""
PG_CLUSTER_SCRIPT = ROOT / ".ci" / "pg-cluster"
"""Names the cluster serving that URL; ``.ci/services`` starts the same one."""
CHAOS_JSON = ROOT / "benchmarks" / "results" / "chaos.json"
"""The tracked record (summary and ``records``): written only on purpose."""
CHAOS_RUNS = ROOT / "benchmarks" / "results" / "chaos-runs.jsonl"
"""Where routine runs append their figures, one JSON line each (git-ignored)."""


def results_path(setting: str) -> Path | None:
    """Where figures go for an ``ORCHESTRATR_CHAOS_RESULTS`` value: unset, the
    git-ignored ``chaos-runs.jsonl``; ``record``, the tracked ``chaos.json`` (``make
    chaos-record``); ``off``, nowhere; else that file (``.json``: as ``chaos.json``)."""
    return {"off": None, "record": CHAOS_JSON, "": CHAOS_RUNS}.get(setting, Path(setting))


RESULTS = results_path(os.environ.get("ORCHESTRATR_CHAOS_RESULTS", ""))
"""Where every measured figure of this run is appended."""

REPORT_MARGIN = 1.0
"""Seconds added to a documented "within one heartbeat" before the checker fails:
the start's event through the broker, the manager's storage transaction, its
stop command back through the broker, and the copy's next step (0.1 s), on a
loaded 2-core machine."""


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
    rebalance_hold: float = 3.0
    """Manager: how long a round caps every server at its share (``ManagerOptions``'
    default; the CLI does not set it)."""
    fence_timeout: float = 4.5
    """Client: give every delivery up after this much silence from the broker —
    strictly less than the broker's earliest detection (2 x broker_heartbeat).
    Not tighter: on a loaded 2-core machine a 1.5 s fence fired falsely."""
    pg_heartbeat: float = 0.5
    """PostgreSQL transport: seconds between the pings of a session."""
    pg_fence_timeout: float = 4.0
    """PostgreSQL transport: no answered statement for this long -> jobs lost."""
    pg_session_timeout: float = 8.0
    """PostgreSQL transport: PostgreSQL ends a silent session (and frees its jobs)
    no sooner than this after the last statement it received."""

    @property
    def duplicate_grace(self) -> float:
        """docs/reliability.md: of two copies run by two messages of one job, the
        lower token's is told to stop "within one heartbeat" -- plus REPORT_MARGIN."""
        return self.heartbeat_interval + REPORT_MARGIN

    @property
    def cancel_grace(self) -> float:
        """docs/reliability.md: a copy started in the window of a cancel the broker
        did not get is stopped as soon as the manager sees its start (the next
        heartbeat) -- plus REPORT_MARGIN."""
        return self.heartbeat_interval + REPORT_MARGIN

    @property
    def cancel_bound(self) -> float:
        """A running copy of a cancelled job on a healthy server ends within the
        stop grace (then it is stopped hard) -- plus REPORT_MARGIN."""
        return self.stop_grace + REPORT_MARGIN


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

    def new_proxy(self, upstream: tuple[str, int]) -> SilentProxy:
        proxy = SilentProxy(*upstream)
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
    exited_at: float | None = None
    frozen: list[tuple[float, float | None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


class _PublishFailures(logging.Handler):
    """What the test's client could not get to the broker, from its warnings.

    ``ids``: jobs whose first publish lost its confirm -- sent, but the broker may
    or may not have stored it (a nack or an unroutable message was surely not
    stored; ``BackendUnavailable`` was never sent). The manager's relay sends those
    again, so two messages of one generation may exist: the documented "Duplicate
    messages" gap of docs/reliability.md, and the only one the checker excuses.

    ``cancels``: jobs whose cancel the client could not broadcast (the manager
    sends it later): the documented cancel gap."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.ids: set[str] = set()
        self.cancels: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        msg = str(record.msg)
        if msg.startswith("job %s created; its message will be sent") and len(args) == 2:
            if lost_confirm(args[1]):
                self.ids.add(str(args[0]))
        elif (
            msg.startswith("job %s %s; the manager will tell the servers")
            and len(args) == 3
            and args[1] == "cancelled"
        ):
            # The client's stop-set broadcast (orchestratr_core.client._send_stop_set).
            self.cancels.add(str(args[0]))


_RESENT = re.compile(r"outbox relay re-sends job (\S+) under generation")


def resent_in(log_text: str) -> set[str]:
    """The jobs a manager's log says its outbox relay sent again."""
    return set(_RESENT.findall(log_text))


_ROUND = re.compile(r'^ts=(\S+) .*msg="rebalance: moving', re.MULTILINE)


def rebalance_rounds(log_text: str) -> list[float]:
    """When (``time.time()``) a manager's log says a rebalancing round moved jobs:
    each such round capped every server at its share for ``rebalance_hold``."""
    return [dt.datetime.fromisoformat(ts).timestamp() for ts in _ROUND.findall(log_text)]


def lost_confirm(exc: object) -> bool:
    """Whether a failed publish may have reached the broker's queue anyway."""
    if not isinstance(exc, PublishError):
        return False  # BackendUnavailable: no connection, nothing was sent
    text = str(exc)
    return not text.startswith(("RabbitMQ refused to store", "RabbitMQ could not route"))


class ChaosCluster:
    """See the module docstring."""

    def __init__(
        self,
        workdir: Path,
        timings: Timings | None = None,
        *,
        database: str = PG_ADMIN,
        broker_url: str | None = None,
        server_broker_url: str | None = None,
        transport: str = "rabbitmq",
    ) -> None:
        """``database``: the storage's server URL. ``broker_url``: the RabbitMQ URL of
        the manager and the test's client (default: the broker under test,
        ``tests/support/rabbitmq.py``), without query. ``server_broker_url``: given,
        the servers connect to it directly (for example a cluster's nodes in another
        order); else each through its own silent proxy to the first node of
        ``broker_url``. ``transport``: ``rabbitmq``, or ``postgresql`` (a fleet on
        PostgreSQL alone: servers reach PostgreSQL through their proxies)."""
        self.workdir = workdir
        self.database = database
        """The database URL (one host, or a primary/standby pair) the schema lives in."""
        self.timings = timings or Timings()
        self.broker_url = broker_url or BROKER_URL
        self.server_broker_url = server_broker_url
        self.transport_kind = transport
        """``rabbitmq`` or ``postgresql`` (a fleet on PostgreSQL alone)."""
        self.run_id = uuid.uuid4().hex[:10]
        self.namespace = f"chaos-{self.run_id}"
        self.schema = f"chaos_{self.run_id}"
        self.ledger_dir = workdir / "ledger"
        self.ledger_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, Proc] = {}
        self.manager: Proc | None = None
        self.managers: list[Proc] = []
        """Every manager process started, in order (``manager`` is the last)."""
        self._manager_count = 0
        self.storage: Storage | None = None
        self.transport: Transport | None = None
        self.client: OrchestratorClient | None = None
        self.monitor: AdminOrchestratorMonitor | None = None
        self.cancelled_at: dict[str, float] = {}
        self.cancels: dict[str, checker.Cancel] = {}
        self.holds: dict[str, list[checker.Hold]] = {}
        self.running: list[checker.Running] = []
        self.views: list[checker.ViewWait] = []
        self.placements: dict[str, Pool] = {}
        self.proxies = ProxyLoop()
        self.unconfirmed = _PublishFailures()
        logging.getLogger("orchestratr.client").addHandler(self.unconfirmed)

    # -- URLs -------------------------------------------------------------------------------

    @property
    def storage_url(self) -> str:
        return self.database_url(self.database)

    def database_url(self, database: str) -> str:
        """The storage URL of this run's schema in ``database``."""
        return f"{database}{'&' if '?' in database else '?'}schema={self.schema}"

    @property
    def broker_port(self) -> int:
        """Where the servers' proxies forward to on PostgreSQL alone: its port."""
        return urlsplit(PG_SERVER).port or 5432

    def transport_url(self, port: int | None = None, base: str | None = None) -> str:
        """The transport URL with this run's namespace and timings: to
        127.0.0.1:``port`` (a proxy) if given, else to ``base`` (default the broker).
        On PostgreSQL alone: the run's schema through the proxy at ``port``."""
        t = self.timings
        if self.transport_kind == "postgresql":
            parts = urlsplit(PG_ADMIN)
            netloc = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
            return (
                f"{parts.scheme}://{netloc}:{port or self.broker_port}{parts.path}"
                f"?schema={self.schema}&namespace=chaos&heartbeat={t.pg_heartbeat}"
                f"&fence_timeout={t.pg_fence_timeout}&session_timeout={t.pg_session_timeout}"
            )
        if port is not None:
            base = f"amqp://guest:guest@127.0.0.1:{port}/"
        return (
            f"{base or self.broker_url}?namespace={self.namespace}"
            f"&heartbeat={t.broker_heartbeat}&fence_timeout={t.fence_timeout}"
        )

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the schema, start the manager, connect the test's own client."""
        conn = await asyncpg.connect(self.database)
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
        for manager in self.managers:
            self._reap(manager)
        self.proxies.stop(
            [p.proxy for p in [*self.procs.values(), *self.managers] if p.proxy is not None]
        )
        with contextlib.suppress(Exception):
            if self.transport is not None:
                await self.transport.close()
        with contextlib.suppress(Exception):
            if self.storage is not None:
                await self.storage.close()
        conn = await asyncpg.connect(self.database)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await conn.close()
        if self.transport_kind == "rabbitmq":
            await drop_namespace(self.namespace, self.broker_url)

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

    async def start_manager(
        self,
        *,
        leader_lease: float | None = None,
        db_proxy: bool = False,
        broker_heartbeat: int | None = None,
    ) -> Proc:
        """Start a manager process (a new one after a kill; another one beside
        the running ones). ``leader_lease``: its ``--leader-lease``. ``db_proxy``:
        reach the database (one host, this port) through a silent proxy of its
        own (a one-host database only), which :meth:`partition_manager` pauses.
        ``broker_heartbeat``: its AMQP heartbeat instead of the run's (a longer
        one keeps a frozen manager's consumers registered with the broker)."""
        self._manager_count += 1
        t = self.timings
        storage = self.storage_url
        proxy = None
        if db_proxy:
            db = urlsplit(self.database)
            proxy = self.proxies.new_proxy(("127.0.0.1", db.port or 5432))
            user = db.netloc.rpartition("@")[0]
            netloc = f"{user}@127.0.0.1:{proxy.port}" if user else f"127.0.0.1:{proxy.port}"
            storage = self.database_url(urlunsplit(db._replace(netloc=netloc)))
        lease = ["--leader-lease", str(leader_lease)] if leader_lease is not None else []
        transport = self.transport_url()
        if broker_heartbeat is not None:
            assert self.transport_kind != "postgresql"
            transport = f"{self.broker_url}?namespace={self.namespace}&heartbeat={broker_heartbeat}"
        proc = self._spawn(
            f"manager-{self._manager_count}",
            "manager",
            [
                "manager",
                "--storage",
                storage,
                "--transport",
                transport,
                "--server-timeout",
                str(t.server_timeout),
                "--rebalance-interval",
                str(t.rebalance_interval),
                *lease,
            ],
            {},
        )
        proc.proxy = proxy
        self.manager = proc
        self.managers.append(proc)
        return proc

    def partition_manager(self, proc: Proc) -> float:
        """Silence the manager's database connections (see :meth:`start_manager`)."""
        assert proc.proxy is not None
        self.proxies.pause(proc.proxy)
        return time.time()

    def heal_manager(self, proc: Proc) -> float:
        """Let the manager's database traffic flow again."""
        assert proc.proxy is not None
        self.proxies.resume(proc.proxy)
        return time.time()

    async def add_server(
        self,
        name: str,
        max_workers: int = 10,
        *,
        job: str = "tests.chaos.jobs:ledger_job",
        kinds: tuple[str, ...] = (),
        labels: tuple[str, ...] = (),
    ) -> Proc:
        """Start an ``orchestratr server`` process behind its own silent proxy (or
        straight to ``server_broker_url``). ``kinds``: run ``job`` for each of these
        kinds (``--job KIND=...``) instead of the default kind; ``labels``:
        ``KEY=VALUE`` labels of the server."""
        proxy: SilentProxy | None = None
        if self.transport_kind == "postgresql":
            proxy = self.proxies.new_proxy(("127.0.0.1", self.broker_port))
            url = self.transport_url(proxy.port)
        elif self.server_broker_url is None:
            proxy = self.proxies.new_proxy(broker_address(self.broker_url))
            url = self.transport_url(proxy.port)
        else:
            url = self.transport_url(base=self.server_broker_url)
        t = self.timings
        jobs = [f"{kind}={job}" for kind in kinds] or [job]
        proc = self._spawn(
            name,
            "server",
            [
                "server",
                *[arg for spec in jobs for arg in ("--job", spec)],
                *[arg for label in labels for arg in ("--label", label)],
                "--name",
                name,
                "--max-workers",
                str(max_workers),
                "--transport",
                url,
                "--heartbeat-interval",
                str(t.heartbeat_interval),
                "--stop-grace",
                str(t.stop_grace),
            ],
            {
                "ORCHESTRATR_LEDGER_DIR": str(self.ledger_dir),
                "ORCHESTRATR_SERVER_LABEL": name,
                "ORCHESTRATR_SERVER_KINDS": ",".join(kinds or ("default",)),
                "ORCHESTRATR_SERVER_LABELS": ",".join(labels),
            },
        )
        proc.proxy = proxy
        proc.max_workers = max_workers
        self.procs[name] = proc
        return proc

    # -- faults ------------------------------------------------------------------------------

    def kill9(self, name: str) -> float:
        """``kill -9`` a server; returns when it happened."""
        proc = self.procs[name]
        proc.popen.send_signal(signal.SIGKILL)
        # Stamped after the signal: the process runs no instruction past this.
        proc.killed_at = time.time()
        proc.popen.wait(timeout=10)  # a killed process is reaped at once
        return proc.killed_at

    async def wait_exit(self, name: str, within: float) -> int:
        """Wait (without blocking the loop) for a process to exit; its status."""
        status = await asyncio.to_thread(self.procs[name].popen.wait, within)
        self._note_exits()
        return status

    def _note_exits(self) -> None:
        """Stamp processes seen gone for the first time (an upper bound of their end)."""
        now = time.time()
        for proc in self.procs.values():
            if proc.exited_at is None and proc.killed_at is None and not proc.alive:
                proc.exited_at = now

    def sigterm(self, name: str) -> float:
        """SIGTERM a server (graceful hand-over)."""
        self.procs[name].popen.send_signal(signal.SIGTERM)
        return time.time()

    def sigstop(self, name: str) -> float:
        """Freeze a server (``SIGSTOP``); returns when it happened."""
        proc = self.procs[name]
        proc.popen.send_signal(signal.SIGSTOP)
        proc.frozen_since = time.time()
        proc.frozen.append((proc.frozen_since, None))
        return proc.frozen_since

    def sigcont(self, name: str) -> float:
        """Thaw a frozen server (``SIGCONT``); returns when it happened."""
        proc = self.procs[name]
        now = time.time()
        if proc.frozen and proc.frozen[-1][1] is None:
            proc.frozen[-1] = (proc.frozen[-1][0], now)
        proc.popen.send_signal(signal.SIGCONT)
        return now

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

    def kill_manager(self, proc: Proc | None = None) -> float:
        """``kill -9`` a manager (default: the last one started)."""
        proc = proc or self.manager
        assert proc is not None
        proc.killed_at = time.time()
        proc.popen.kill()
        proc.popen.wait(timeout=10)
        return proc.killed_at

    async def restart_broker(self) -> tuple[float, float]:
        """``rabbitmqctl stop_app`` then ``start_app`` on the broker under test:
        (stopped at, back up at). On PostgreSQL alone the broker is PostgreSQL: it
        is restarted."""
        if self.transport_kind == "postgresql":
            down = time.time()
            return down, await self.restart_postgres()
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        down = time.time()
        await asyncio.to_thread(rabbitmqctl, "start_app")
        up = time.time()
        await asyncio.to_thread(rabbitmqctl, "await_startup")
        return down, up

    async def restart_postgres(self) -> float:
        """Restart the PostgreSQL cluster the tests use (fast shutdown: connections
        drop) and check that it really restarted; returns when it was back."""
        version, cluster = await pg_cluster()
        before = await postmaster_started()
        await _run("pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "restart")
        back = time.time()
        after = await postmaster_started(wait=30)
        assert after > before, (
            f"PostgreSQL {version}/{cluster} was not restarted: it started at {before} "
            f"before and at {after} after (is it the cluster serving {PG_ADMIN}?)"
        )
        return back

    # -- jobs --------------------------------------------------------------------------------

    async def create(
        self,
        n: int,
        prefix: str = "job",
        *,
        kind: str = "default",
        require: tuple[str, ...] = (),
        spread: str | None = None,
    ) -> list[str]:
        """Create jobs the way an application would: a create that fails with
        BackendUnavailable (the database is restarting) is retried; one whose
        commit went through before the connection dropped is found by name.
        ``kind`` and ``require``: the jobs' placement, kept for the checker (I7);
        ``spread``: their spread group."""
        ids = [
            await self._create_one(f"{prefix}-{i}", str(i), kind, require, spread) for i in range(n)
        ]
        for job_id in ids:
            self.placements[job_id] = Pool.of(kind, require)
        return ids

    async def _create_one(
        self,
        name: str,
        argument: str,
        kind: str = "default",
        require: tuple[str, ...] = (),
        spread: str | None = None,
    ) -> str:
        assert self.client is not None and self.monitor is not None
        deadline = time.time() + 30
        retried = False
        while True:
            try:
                return await self.client.create_job(
                    name, argument, kind=kind, require=list(require), spread=spread
                )
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
        """Cancel a job as an application would (retrying while the database is
        down), and note when and whether the broker got it, for the checker (I3)."""
        assert self.client is not None
        deadline = time.time() + 30
        while True:
            asked = time.time()
            try:
                await self.client.mark_on_deleting(job_id)
                break
            except BackendUnavailable:
                if time.time() > deadline:
                    raise
                await asyncio.sleep(0.5)
        self.cancelled_at[job_id] = time.time()
        self.cancels[job_id] = checker.Cancel(
            at=self.cancelled_at[job_id],
            delivered=job_id not in self.unconfirmed.cancels,
            asked=asked,
        )

    async def wait_cancels_final(
        self, within: float, *, deleted_within: float | None = None, figure: str | None = None
    ) -> float:
        """Wait until every cancelled job not yet seen final has no running copy
        (each within ``within`` seconds of its cancel) and is ``deleted`` in the
        storage (within ``deleted_within``, default ``within``, of its cancel);
        the longest time from one of those cancels (the call) until its job was
        final (its last copy ended, the storage recorded it deleted). The checker then
        holds every copy of each job to ``within`` (I3). ``figure``: record that
        time under this name."""
        took = 0.0
        deleted_within = within if deleted_within is None else deleted_within
        while True:
            pending = {j: c for j, c in self.cancels.items() if c.bound is None}
            records = {job.id: job for job in await self.jobs()}
            statuses = {j: r.status for j, r in records.items()}
            copies, now = self.copies(), time.time()
            facts = self.facts(now)
            running = {c.job for c in checker.live_at(copies, facts, now)}
            procs = {p.pid: p for p in facts.processes}
            for job_id, cancel in pending.items():
                if job_id not in running and statuses.get(job_id) is JobStatus.DELETED:
                    cancel.bound, cancel.status = within, JobStatus.DELETED
                    ends = [
                        checker.copy_end(c, procs.get(c.pid)) or now
                        for c in copies
                        if c.job == job_id
                    ]
                    final = max([records[job_id].updated_at.timestamp(), *ends])
                    took = max(took, final - (cancel.asked or cancel.at))
            late = {
                j: (statuses.get(j), j in running)
                for j, c in pending.items()
                if c.bound is None
                and (now > c.at + deleted_within or (j in running and now > c.at + within))
            }
            if late:
                raise AssertionError(
                    f"cancelled jobs not final in time (status, still running): {late} "
                    f"({self.tail_logs()})"
                )
            if all(c.bound is not None for c in pending.values()):
                if figure is not None and pending:
                    self.record_figure(figure, took, within, "cancelled jobs final")
                return took
            await asyncio.sleep(0.2)

    async def pause(self, job_id: str) -> None:
        """Pause a job through the test's client; noted for the checker (I8)."""
        assert self.client is not None
        await self.client.pause(job_id)
        self.holds.setdefault(job_id, []).append(checker.Hold(at=time.time()))

    async def resume(self, job_id: str) -> None:
        """Resume a paused job; the checker lets copies start again from now."""
        assert self.client is not None
        released = time.time()
        record = await self.client.resume(job_id)
        assert record.status is JobStatus.PENDING, record
        for hold in self.holds.get(job_id, []):
            if hold.released is None:
                hold.released = released

    async def update(self, job_id: str, argument: str) -> float:
        """Update a job's argument through the test's client; returns when. Noted
        for the checker as a hold (I8) that :meth:`wait_restarted` releases: the
        copy of the old argument ends within the bound, and nothing starts before
        the restart."""
        assert self.client is not None
        record = await self.client.update(job_id, argument)
        assert record.argument == argument, record
        at = time.time()
        self.holds.setdefault(job_id, []).append(checker.Hold(at=at))
        return at

    async def wait_restarted(
        self, job_ids: list[str], argument: str, within: float, *, figure: str | None = None
    ) -> float:
        """Wait until each updated job has exactly one live copy, started with
        ``argument`` after its update, within ``within`` of the update; the
        update's hold is then released at that copy's start, with ``within`` as
        the bound of the old copy (I8). Returns the longest time it took."""
        took = 0.0
        while True:
            copies, now = self.copies(), time.time()
            live = checker.live_at(copies, self.facts(now), now)
            open_holds = [(j, h) for j in job_ids for h in self.holds[j] if h.released is None]
            for job_id, hold in open_holds:
                mine = [c for c in live if c.job == job_id]
                if len(mine) == 1 and mine[0].argument == argument and mine[0].start > hold.at:
                    hold.released, hold.bound = mine[0].start, within
                    took = max(took, mine[0].start - hold.at)
                elif now > hold.at + within:
                    raise AssertionError(
                        f"job {job_id} not restarted with {argument!r} within {within} s: "
                        f"live copies {[(c.server, c.argument) for c in mine]} "
                        f"({self.tail_logs()})"
                    )
            if all(h.released is not None for _, h in open_holds):
                if figure is not None and open_holds:
                    self.record_figure(figure, took, within, "restarted with the new argument")
                return took
            await asyncio.sleep(0.2)

    async def wait_paused(self, job_ids: list[str], within: float) -> float:
        """Wait until each job has no live copy and is ``paused`` in the storage,
        within ``within`` of its pause; the checker then holds every copy of each
        to that bound (I8). Returns the longest time it took."""
        took = 0.0
        while True:
            records = {job.id: job for job in await self.jobs()}
            copies, now = self.copies(), time.time()
            running = {c.job for c in checker.live_at(copies, self.facts(now), now)}
            open_holds = [(j, h) for j in job_ids for h in self.holds[j] if h.bound is None]
            for job_id, hold in open_holds:
                if job_id not in running and records[job_id].status is JobStatus.PAUSED:
                    hold.bound = within
                    took = max(took, now - hold.at)
                elif now > hold.at + within:
                    raise AssertionError(
                        f"job {job_id} not paused within {within} s: "
                        f"{records[job_id].status.value}, running={job_id in running} "
                        f"({self.tail_logs()})"
                    )
            if all(h.bound is not None for _, h in open_holds):
                return took
            await asyncio.sleep(0.2)

    async def jobs(self) -> list[JobRecord]:
        assert self.monitor is not None
        return await self.monitor.all_jobs(JobQuery(include_deleted=True, limit=None))

    async def servers(self) -> list[ServerRecord]:
        assert self.monitor is not None
        return await self.monitor.servers(ServerQuery(statuses=None))

    async def lease_holder(self, name: str = "leader") -> str | None:
        """The id of the manager holding the lease ``name`` now (from the
        storage's ``leases`` table), or ``None``."""
        conn = await asyncpg.connect(self.database)
        try:
            value = await conn.fetchval(
                f'SELECT holder FROM "{self.schema}".leases'
                " WHERE name = $1 AND lease_until > now()",
                name,
            )
        finally:
            await conn.close()
        return None if value is None else str(value)

    # -- the ledger ------------------------------------------------------------------------------

    def copies(self) -> list[Copy]:
        """Every copy of every job the ledger files record."""
        return checker.read_ledger(self.ledger_dir)

    def dead_at(self, pid: int) -> float | None:
        """When a server process was killed (``kill -9``), if it was."""
        for proc in self.procs.values():
            if proc.pid == pid:
                return proc.killed_at
        return None

    def facts(self, now: float | None = None) -> checker.Facts:
        """What the checker needs besides the ledger, as observed so far."""
        self._note_exits()
        return checker.Facts(
            now=time.time() if now is None else now,
            processes=[
                checker.Process(
                    server=p.name,
                    pid=p.pid,
                    max_workers=p.max_workers,
                    killed_at=p.killed_at,
                    exited_at=p.exited_at,
                    frozen=list(p.frozen),
                )
                for p in self.procs.values()
            ],
            cancels=self.cancels,
            lost_confirms=set(self.unconfirmed.ids) | self.resent_ids(),
            running=self.running,
            views=self.views,
            holds=self.holds,
            placements=self.placements,
        )

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
        figure: str | None = None,
    ) -> float:
        """Wait until each job has exactly one live copy (not on ``exclude``
        servers, started after ``after`` when given); the seconds it took. The
        instant it saw them so is kept for the checker (I2). ``figure``: record
        the seconds under this name, with ``within`` as its bound."""
        t0 = time.time()
        wanted = set(job_ids)
        while True:
            live: dict[str, int] = {}
            for c in self.live_copies(exclude=exclude, after=after):
                live[c.job] = live.get(c.job, 0) + 1
            seen = time.time()  # after the read: every line it saw is older
            if all(live.get(j) == 1 for j in wanted):
                self.running.append(
                    checker.Running(tuple(job_ids), t0, within, seen, exclude, after)
                )
                if figure is not None:
                    self.record_figure(figure, seen - t0, within, "all jobs running again")
                return seen - t0
            if time.time() - t0 > within:
                missing = sorted(j for j in wanted if live.get(j) != 1)
                raise AssertionError(
                    f"{len(missing)} job(s) not running exactly once after {within} s: "
                    f"{missing[:5]} ({self.tail_logs()})"
                )
            await asyncio.sleep(0.1)

    async def wait_rebalance_quiet(self, within: float) -> float:
        """Wait until no rebalancing round caps a server or is about to: the live
        copies are spread as the leader leaves them (no live server more than one
        job above its capacity-proportional share) and the last round that moved
        jobs is older than its hold plus a round. A round caps *every* server at
        its share of the fleet the leader saw for ``rebalance_hold`` (3 s), so the
        jobs of a server killed just before or during one may wait for the cap to
        end -- longer than the ``kill -9`` bound, which docs/reliability.md gives
        for a fleet with no cap in force. The seconds it took."""
        t0 = time.time()
        t = self.timings
        while True:
            servers = [
                p for p in self.procs.values() if p.alive and p.killed_at is None and p.max_workers
            ]
            running = {p.name: 0 for p in servers}
            for c in self.live_copies():
                if c.server in running:
                    running[c.server] += 1
            total, capacity = sum(running.values()), sum(p.max_workers for p in servers)
            even = not servers or all(
                running[p.name] - total * p.max_workers / capacity <= 1 for p in servers
            )
            rounds = [r for m in self.managers for r in rebalance_rounds(m.log.read_text())]
            last = max(rounds, default=0.0)
            now = time.time()
            if even and now - last > t.rebalance_hold + t.rebalance_interval:
                return now - t0
            if now - t0 > within:
                raise AssertionError(
                    f"rebalancing not quiet after {within} s: {running}, last round "
                    f"{now - last:.1f} s ago ({self.tail_logs()})"
                )
            await asyncio.sleep(0.2)

    async def wait_running(
        self, job_ids: list[str], count: int, within: float, *, exclude: tuple[str, ...] = ()
    ) -> float:
        """At capacity: wait until exactly ``count`` of the jobs have one live copy
        each and none has more (off ``exclude`` servers); the seconds it took."""
        t0 = time.time()
        wanted = set(job_ids)
        while True:
            live: dict[str, int] = {}
            for c in self.live_copies(exclude=exclude):
                if c.job in wanted:
                    live[c.job] = live.get(c.job, 0) + 1
            if len(live) == count and all(n == 1 for n in live.values()):
                return time.time() - t0
            if time.time() - t0 > within:
                raise AssertionError(
                    f"{len(live)} job(s) running, {count} wanted, after {within} s: "
                    f"{ {j: n for j, n in live.items() if n != 1} } ({self.tail_logs()})"
                )
            await asyncio.sleep(0.1)

    def tail_logs(self, lines: int = 15) -> str:
        """The last lines of every process's log, for a failure message."""
        out = []
        for proc in [*self.procs.values(), *self.managers]:
            text = proc.log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {proc.name} ---\n" + "\n".join(text))
        return "\n".join(out)

    def resent_ids(self) -> set[str]:
        """Jobs whose message a manager's outbox relay sent again (under a new
        generation), from the managers' logs: the first message may have been
        sent too (its sender could not delete its outbox row), so two copies may
        overlap briefly -- under two tokens, the older one told to stop."""
        out: set[str] = set()
        for proc in self.managers:
            out |= resent_in(proc.log.read_text(errors="replace"))
        return out

    # -- the checker and the figures -------------------------------------------------------------

    def check(self, *, final: bool = True) -> Report:
        """Judge I1-I4 and I6 over the whole ledger (``checker.check``). A check
        in the middle of a test passes ``final=False``: cancels not yet seen
        final by ``wait_cancels_final`` are then not a violation."""
        return checker.check(self.copies(), self.facts(), final=final)

    async def _view(self, job_ids: list[str]) -> checker.ViewSample:
        servers = {s.id: s.name for s in await self.servers()}
        wanted = set(job_ids)
        jobs = {
            j.id: (j.status, servers.get(j.server_id or ""))
            for j in await self.jobs()
            if j.id in wanted
        }
        return checker.ViewSample(time.time(), jobs)

    async def view_matches_ledger(self, job_ids: list[str]) -> list[str]:
        """I4: jobs whose manager view (status/server) disagrees with the ledger."""
        sample = await self._view(job_ids)
        copies = self.copies()
        sample.at = time.time()  # after the read: every line it saw is older
        return checker.view_mismatches(sample, checker.live_at(copies, self.facts(), sample.at))

    async def wait_view_converges(
        self, job_ids: list[str], within: float, *, figure: str | None = None
    ) -> float:
        """Wait until the manager's view of the jobs matches the ledger; the
        seconds it took. Every sample is kept for the checker (I4). ``figure``:
        record the seconds under this name, with ``within`` as its bound.

        Converged means two samples in a row matched: a copy may end just before
        a sample whose ledger read does not hold its stop line yet (a rebalance
        in flight), and the checker, reading the whole ledger later, would find
        that one sample wrong; the next sample sees the stop."""
        t0 = time.time()
        wait = checker.ViewWait(tuple(job_ids), t0, within)
        self.views.append(wait)
        first_match: float | None = None
        while True:
            sample = await self._view(job_ids)
            copies = self.copies()
            sample.at = time.time()
            wait.samples.append(sample)
            live = checker.live_at(copies, self.facts(sample.at), sample.at)
            wrong = checker.view_mismatches(sample, live)
            if not wrong and first_match is not None:
                if figure is not None:
                    self.record_figure(figure, first_match - t0, within, "view converged")
                return first_match - t0
            first_match = None if wrong else sample.at
            if wrong and time.time() - t0 > within:
                records = [j.to_dict() for j in await self.jobs() if j.id in str(wrong[:5])]
                servers = [(s.name, s.status.value, str(s.last_seen)) for s in await self.servers()]
                raise AssertionError(
                    f"manager view wrong after {within} s: {wrong[:5]}; records: {records}; "
                    f"servers: {servers}"
                )
            await asyncio.sleep(0.2)

    async def wait_server_seen(
        self, name: str, since: float, within: float, *, figure: str | None = None
    ) -> float:
        """Wait until the manager's view has server ``name`` alive with a heartbeat
        from ``since`` (``time.time()``) on; the seconds it took from ``since``."""
        while True:
            servers = await self.servers()
            now = time.time()
            if any(
                s.name == name and s.status.value == "alive" and s.last_seen.timestamp() >= since
                for s in servers
            ):
                if figure is not None:
                    self.record_figure(figure, now - since, within, "heartbeat seen")
                return now - since
            if now - since > within:
                seen = [(s.name, s.status.value, str(s.last_seen)) for s in servers]
                raise AssertionError(f"no heartbeat of {name} within {within} s: {seen}")
            await asyncio.sleep(0.1)

    async def wait_server_status(self, name: str, status: str, within: float) -> float:
        """Wait until the manager's view shows server ``name`` with ``status``
        (``"left"``, ``"dead"``...); the seconds it took."""
        start = time.time()
        while True:
            servers = {s.name: s.status.value for s in await self.servers()}
            if servers.get(name) == status:
                return time.time() - start
            if time.time() - start > within:
                raise AssertionError(f"{name} not {status} within {within} s: {servers}")
            await asyncio.sleep(0.05)

    def record_figure(self, figure: str, value: float, bound: float, what: str = "") -> None:
        """Print a measured figure (``benchmarks/chaos_report.py`` reads these lines)
        and append it to the results file (``RESULTS``) with its bound, the test,
        the time and the commit, so that a regression shows as a number even
        while it stays under the promise."""
        print(f"{figure}: {what or 'measured'} after {value:.2f} s")
        record_figure(figure, value, bound)


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {out.decode(errors='replace')[-500:]}")


def seeded(seed: int | None = None, *, daily: bool = False) -> tuple[random.Random, int]:
    """A seeded random generator for soak tests; prints the seed. ``CHAOS_SEED``
    overrides it; otherwise ``daily``: the UTC date (``20261205``), so that a
    day's runs repeat each other and the next day's differ; else the clock."""
    if seed is not None:
        value = seed
    elif os.environ.get("CHAOS_SEED"):
        value = int(os.environ["CHAOS_SEED"])
    elif daily:
        value = int(dt.datetime.now(dt.UTC).strftime("%Y%m%d"))
    else:
        value = time.time_ns() % 10**9
    print(f"chaos seed: {value} (CHAOS_SEED={value} reproduces it)")
    return random.Random(value), value


# -- PostgreSQL: the one cluster the tests use -------------------------------------------------


async def pg_cluster() -> tuple[str, str]:
    """(version, name) of the PostgreSQL cluster serving ``ORCHESTRATR_TEST_PG``,
    as ``.ci/pg-cluster`` names it for ``.ci/services`` too."""
    proc = await asyncio.create_subprocess_exec(
        "bash", str(PG_CLUSTER_SCRIPT), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "ORCHESTRATR_TEST_PG": PG_SERVER},
    )  # fmt: skip
    out, err = await proc.communicate()
    words = out.decode().split()
    if proc.returncode != 0 or len(words) != 3:
        raise RuntimeError(f"{PG_CLUSTER_SCRIPT} failed: {err.decode(errors='replace')}")
    return words[0], words[1]


async def postmaster_started(wait: float = 0.0) -> dt.datetime:
    """``pg_postmaster_start_time()`` of the test database, retrying up to ``wait``
    seconds while it does not answer (it is restarting)."""
    deadline = time.time() + wait
    while True:
        try:
            conn = await asyncpg.connect(PG_ADMIN)
            try:
                value = await conn.fetchval("SELECT pg_postmaster_start_time()")
            finally:
                await conn.close()
            assert isinstance(value, dt.datetime)
            return value
        except (OSError, asyncpg.PostgresError):
            if time.time() > deadline:
                raise
            await asyncio.sleep(0.2)


# -- figures --------------------------------------------------------------------------------


def _commit() -> str:
    """The commit under test; ``-dirty`` when tracked code differs from it (the
    results files themselves do not count: every run changes them)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(exclude)benchmarks/results"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if changed else "")


def record_figure(figure: str, value: float, bound: float, *, path: Path | None = None) -> None:
    """Append one measured figure (``path``, default ``RESULTS``): the test, the
    figure, its value and bound in seconds, the UTC time and the git commit. A
    ``.json`` file gets it in its ``records``, keeping the other keys (the summary
    that ``benchmarks/chaos_report.py`` writes); any other file, as one JSON line.
    Concurrent writers take turns. ``path`` None and ``ORCHESTRATR_CHAOS_RESULTS=off``:
    nothing is recorded."""
    path = RESULTS if path is None else path
    if path is None:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    entry = {
        "test": test,
        "figure": figure,
        "value": round(value, 3),
        "bound": bound,
        "unit": "s",
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix != ".json":
        with path.open("a", encoding="utf-8") as lines:
            fcntl.flock(lines, fcntl.LOCK_EX)
            lines.write(json.dumps(entry) + "\n")
        return
    while True:
        # Locked by its inode; a writer that locked a file since replaced tries again.
        with path.open("a+", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.fstat(lock.fileno()).st_ino != os.stat(path).st_ino:
                continue
            lock.seek(0)
            text = lock.read()
            data = json.loads(text) if text.strip() else {}
            data.setdefault("records", []).append(entry)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(dump_results(data), encoding="utf-8")
            os.replace(tmp, path)
            return
