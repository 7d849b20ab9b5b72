"""The three systems under test behind one small interface: start a worker of a
given capacity (optionally through a proxy port), submit jobs, tear down.

Every instance uses names of its own (``bench-<run>-<tag>...``) that
:meth:`System.teardown` deletes from the broker (and, for OrchestratR, a
PostgreSQL schema of its own that it drops)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aio_pika

from benchmarks.common import (
    AMQP,
    BROKER_PORT,
    PG_ADMIN,
    Proc,
    Procs,
    create_schema,
    delete_broker_objects,
    drop_schema,
)

CELERY_SETTINGS = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "pool": "threads",
    "concurrency": "jobs per worker (capacity)",
    "broker_heartbeat": "120 s (default) / 5 s (tight)",
    "worker_cancel_long_running_tasks_on_connection_loss": True,
    "queue": "quorum (x-queue-type)",
    "flags": "--without-gossip --without-mingle --without-heartbeat",
    "task_ignore_result": True,
    "task": "loop: sleep 1 s, check celery.worker.state.revoked (revoke() reaches it)",
}

DRAMATIQ_SETTINGS = {
    "acknowledgement": "after the actor returns (Dramatiq's only mode)",
    "worker_threads": "jobs per worker (capacity)",
    "dramatiq_queue_prefetch": "= worker threads",
    "time_limit_ms": 2**31 - 1,
    "max_retries": 0,
    "heartbeat": "broker's 60 s (default) / 5 s (tight)",
    "queue": "classic (declared by Dramatiq)",
    "task": "loop: sleep 1 s, check a process-wide stop flag (no revoke exists)",
}

CREATE_CONCURRENCY = 32
"""OrchestratR: ``create_job`` calls in flight at once when submitting many."""
CREATE_BATCH = 500
"""OrchestratR: jobs per ``create_jobs`` call when submitting many (batch API)."""
CREATE_BATCHES_IN_FLIGHT = 4


class System:
    """One system under test."""

    name = "?"
    default_heartbeat = 0

    def __init__(self, procs: Procs, ledger_dir: Path, prefix: str, *, heartbeat: int | None):
        self.procs = procs
        self.ledger_dir = ledger_dir
        self.prefix = prefix
        self.heartbeat = heartbeat or self.default_heartbeat
        self.workers: list[Proc] = []

    # -- to implement -----------------------------------------------------------------------
    @property
    def queue(self) -> str:
        raise NotImplementedError

    async def setup(self) -> None:
        """Anything needed before workers start."""

    def worker_argv(self, label: str, capacity: int, port: int) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    async def submit(self, keys: list[str]) -> dict[str, float]:
        """Submit one job per key; returns the time each submission began."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- common -----------------------------------------------------------------------------
    async def start_worker(self, label: str, capacity: int, *, port: int = BROKER_PORT) -> Proc:
        argv, env = self.worker_argv(label, capacity, port)
        env = {"BENCH_LEDGER": str(self.ledger_dir), **env}
        before = await self.consumers()
        proc = self.procs.spawn(f"{self.prefix}-{label}", argv, env)
        self.workers.append(proc)
        deadline = time.monotonic() + 120
        while await self.consumers() <= before:
            if not proc.alive:
                raise RuntimeError(f"{proc.name} exited: {proc.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name} did not consume: {proc.text()[-3000:]}")
            await asyncio.sleep(0.1)
        return proc

    async def consumers(self) -> int:
        """Consumers on the jobs queue now (0 if it does not exist yet)."""
        connection = await aio_pika.connect(AMQP)
        try:
            channel = await connection.channel()
            try:
                result = await channel.channel.queue_declare(self.queue, passive=True)
            except Exception:
                return 0
            return int(result.consumer_count or 0)  # type: ignore[union-attr]
        finally:
            await connection.close()

    async def teardown(self) -> None:
        for proc in self.workers:  # no graceful hand-over needed: the queues go too
            self.procs.stop(proc, timeout=0)
        await delete_broker_objects(self.prefix)


class OrchestratR(System):
    """OrchestratR: a manager process (PostgreSQL storage), ``orchestratr server``
    processes, and a client in the benchmark process."""

    name = "orchestratr"
    default_heartbeat = 3

    def __init__(self, *args: Any, server_heartbeat: float = 2.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schema = self.prefix.replace("-", "_")
        self.server_heartbeat = server_heartbeat
        self.manager: Proc | None = None
        self.client: Any = None
        self._storage: Any = None
        self._transport: Any = None

    @property
    def queue(self) -> str:
        return f"{self.prefix}.jobs"

    def transport_url(self, port: int = BROKER_PORT) -> str:
        return (
            f"amqp://guest:guest@127.0.0.1:{port}/?namespace={self.prefix}"
            f"&heartbeat={self.heartbeat}"
        )

    def storage_url(self, pool: int = 10) -> str:
        return f"{PG_ADMIN}?schema={self.schema}&pool_max={pool}"

    async def setup(self) -> None:
        from orchestratr_core import OrchestratorClient
        from orchestratr_core.plugin import get_plugin_manager

        await create_schema(self.schema)
        pm = get_plugin_manager()
        self._storage = pm.make_storage(self.storage_url(CREATE_CONCURRENCY))
        self._transport = pm.make_transport(self.transport_url())
        await self._storage.open()  # runs the migrations before the manager starts
        await self._transport.connect()
        self.client = OrchestratorClient(self._storage, self._transport)
        self.manager = self.procs.python(f"{self.prefix}-manager", self.manager_argv())

    def manager_argv(self) -> list[str]:
        """The ``orchestratr manager`` command line (after the interpreter)."""
        return [
            "-m", "orchestratr_core.cli", "--log-level", "warning", "manager",
            "--storage", self.storage_url(),
            "--transport", self.transport_url(),
        ]  # fmt: skip

    def worker_argv(self, label: str, capacity: int, port: int) -> tuple[list[str], dict[str, str]]:
        import sys

        return [
            sys.executable, "-m", "orchestratr_core.cli", "--log-level", "warning", "server",
            "--job", "benchmarks.workloads:orx_job",
            "--name", label,
            "--max-workers", str(capacity),
            "--transport", self.transport_url(port),
            "--heartbeat-interval", str(self.server_heartbeat),
        ], {}  # fmt: skip

    async def submit(self, keys: list[str]) -> dict[str, float]:
        """Many jobs at once: the batch API, ``CREATE_BATCHES_IN_FLIGHT`` calls of
        ``CREATE_BATCH`` jobs in flight (one INSERT per batch, pipelined publishes)."""
        sent: dict[str, float] = {}
        gate = asyncio.Semaphore(CREATE_BATCHES_IN_FLIGHT)

        async def batch(chunk: list[str]) -> None:
            async with gate:
                began = time.time()
                sent.update(dict.fromkeys(chunk, began))
                await self.client.create_jobs([(key, "") for key in chunk])

        chunks = [keys[i : i + CREATE_BATCH] for i in range(0, len(keys), CREATE_BATCH)]
        await asyncio.gather(*(batch(c) for c in chunks))
        return sent

    async def submit_one(self, key: str) -> float:
        t0 = time.time()
        await self.client.create_job(key, "")
        return t0

    async def teardown(self) -> None:
        for proc in [*self.workers, *([self.manager] if self.manager else [])]:
            self.procs.stop(proc, timeout=0)
        with contextlib.suppress(Exception):
            await self._transport.close()
        with contextlib.suppress(Exception):
            await self._storage.close()
        await self.drop_queues()
        await drop_schema(self.schema)

    async def drop_queues(self) -> None:
        """Delete this run's queues and exchanges from the broker."""
        await delete_broker_objects(self.prefix)

    def settings(self) -> dict[str, Any]:
        return {
            "storage": "PostgreSQL (orchestratr_sql, asyncpg)",
            "transport": "RabbitMQ (orchestratr_rabbitmq), quorum jobs queue",
            "amqp_heartbeat_s": self.heartbeat,
            "fence_timeout_s": 1.5 * self.heartbeat,
            "prefetch_step": "500 (default): capacity granted 500 deliveries at a time",
            "server_heartbeat_interval_s": self.server_heartbeat,
            "max_workers": "jobs per server (capacity)",
            "job": "async: heartbeat(), await token.sleep(10) until stopped",
            "client": f"one job: OrchestratorClient.create_job; many: create_jobs, "
            f"{CREATE_BATCHES_IN_FLIGHT} batches of {CREATE_BATCH} in flight",
            "manager": "one `orchestratr manager` process, defaults",
        }


class OrchestratRSigned(OrchestratR):
    """OrchestratR with a fleet signing key: every message HMAC-signed and checked
    (``--signing-key-file`` through the transport URL, for manager, servers and client)."""

    name = "orchestratr-signed"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import secrets

        self.key_file = self.ledger_dir.parent / "fleet.key"
        self.key_file.write_text(secrets.token_hex(32) + "\n")
        self.key_file.chmod(0o600)

    def transport_url(self, port: int = BROKER_PORT) -> str:
        return f"{super().transport_url(port)}&signing_key_file={self.key_file}"

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "signing": "HMAC-SHA256 on every message (a key file)"}


class OrchestratRKinds(OrchestratR):
    """OrchestratR with four job kinds: every server runs the four (one pool, so one
    quorum queue and one consumer, per kind), the jobs spread evenly over them."""

    name = "orchestratr-kinds4"
    kinds = ("k0", "k1", "k2", "k3")

    @property
    def queue(self) -> str:
        return f"{self.prefix}.jobs.{self.kinds[0]}"  # a worker is up once it consumes it

    async def setup(self) -> None:
        """As :meth:`OrchestratR.setup`, then register the four pools (as the first
        job of each kind would), so that a starting worker consumes them at once."""
        from orchestratr_core.placement import Pool

        await super().setup()
        transport = self._transport
        session = await transport._live()
        for kind in self.kinds:
            await transport._register_pool(session, Pool.of(kind))

    def worker_argv(self, label: str, capacity: int, port: int) -> tuple[list[str], dict[str, str]]:
        argv, env = super().worker_argv(label, capacity, port)
        job = argv.index("--job")
        spec = argv[job + 1]
        kinds = [arg for kind in self.kinds for arg in ("--job", f"{kind}={spec}")]
        return [*argv[:job], *kinds, *argv[job + 2 :]], env

    async def submit(self, keys: list[str]) -> dict[str, float]:
        """As :meth:`OrchestratR.submit`, the jobs' kinds taking turns."""
        sent: dict[str, float] = {}
        gate = asyncio.Semaphore(CREATE_BATCHES_IN_FLIGHT)
        kinds = self.kinds

        async def batch(chunk: list[tuple[str, str, str]]) -> None:
            async with gate:
                sent.update(dict.fromkeys((key for key, _, _ in chunk), time.time()))
                await self.client.create_jobs(chunk)

        items = [(key, "", kinds[i % len(kinds)]) for i, key in enumerate(keys)]
        chunks = [items[i : i + CREATE_BATCH] for i in range(0, len(items), CREATE_BATCH)]
        await asyncio.gather(*(batch(c) for c in chunks))
        return sent

    async def submit_one(self, key: str) -> float:
        t0 = time.time()
        await self.client.create_job(key, "", kind=self.kinds[0])
        return t0

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "kinds": "4 kinds, every server runs all four"}


class OrchestratRPg(OrchestratR):
    """OrchestratR on PostgreSQL alone: the ``postgresql`` transport (``--transport
    postgresql://...``) on the same PostgreSQL as the storage; RabbitMQ is not used."""

    name = "orchestratr-pg"

    @property
    def namespace(self) -> str:
        return self.prefix.replace("-", "_")

    def transport_url(self, port: int = BROKER_PORT) -> str:
        # The transport's own tables go into the run's schema, beside the storage's.
        return f"{PG_ADMIN}?schema={self.schema}&namespace={self.namespace}"

    async def consumers(self) -> int:
        return len(await self.transport_backend_pids())

    async def transport_backend_pids(self) -> list[int]:
        """PostgreSQL backends serving this run's transport sessions (same host)."""
        import asyncpg

        conn = await asyncpg.connect(PG_ADMIN)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                f"orchestratr-transport:{self.namespace}",
            )
        finally:
            await conn.close()
        return [int(r["pid"]) for r in rows]

    async def drop_queues(self) -> None:
        """Nothing: this system has no broker objects (its tables go with the schema)."""

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "transport": "PostgreSQL (orchestratr_sql.pgtransport), same database as the "
            "storage; no RabbitMQ",
            "amqp_heartbeat_s": "-",
            "fence_timeout_s": "3 (ping every 1 s; PostgreSQL frees a silent session's jobs "
            "after 8 s)",
            "prefetch_step": "claims of up to 100 rows per statement",
        }


class Celery(System):
    """Celery workers (threads pool) on RabbitMQ."""

    name = "celery"
    default_heartbeat = 120

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._app: Any = None

    @property
    def queue(self) -> str:
        return f"{self.prefix}-celery"

    async def setup(self) -> None:
        from benchmarks.celery_app import make_app

        self._app = make_app(AMQP, self.queue, self.heartbeat)
        # Declare the queue (the workers would too) so consumers can be counted.
        await asyncio.to_thread(self._declare)

    def _declare(self) -> None:
        with self._app.connection_for_write() as conn:
            for queue in self._app.conf.task_queues:
                queue(conn.default_channel).declare()

    def worker_argv(self, label: str, capacity: int, port: int) -> tuple[list[str], dict[str, str]]:
        import sys

        return [
            sys.executable, "-m", "celery", "-A", "benchmarks.celery_app", "worker",
            "-P", "threads", "-c", str(capacity), "--prefetch-multiplier", "1",
            "-Q", self.queue, "-n", f"{label}-{self.prefix}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning",
        ], {
            "BENCH_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{port}//",
            "BENCH_QUEUE": self.queue,
            "BENCH_HEARTBEAT": str(self.heartbeat),
        }  # fmt: skip

    def _send(self, keys: list[str]) -> dict[str, float]:
        sent: dict[str, float] = {}
        with self._app.producer_or_acquire() as producer:
            for key in keys:
                sent[key] = time.time()
                self._app.send_task(
                    "bench.infinite", args=[key], queue=self.queue, producer=producer
                )
        return sent

    async def submit(self, keys: list[str]) -> dict[str, float]:
        return await asyncio.to_thread(self._send, keys)

    async def submit_one(self, key: str) -> float:
        return self._send([key])[key]

    def settings(self) -> dict[str, Any]:
        return {**CELERY_SETTINGS, "broker_heartbeat": self.heartbeat, "publish": "send_task"}


class Dramatiq(System):
    """Dramatiq worker processes on RabbitMQ."""

    name = "dramatiq"
    default_heartbeat = 60  # pika leaves it to the broker, whose default is 60 s

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._broker: Any = None
        self._actor: Any = None

    @property
    def queue(self) -> str:
        return f"{self.prefix}-dramatiq"

    async def setup(self) -> None:
        import dramatiq
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        from benchmarks.workloads import poll_loop

        self._broker = RabbitmqBroker(url=AMQP.rstrip("/") + "/%2F")

        def infinite(key: str) -> None:  # never run here: only sent
            poll_loop(key, lambda: True)

        self._actor = dramatiq.actor(
            infinite,
            broker=self._broker,
            queue_name=self.queue,
            time_limit=2**31 - 1,
            max_retries=0,
        )
        await asyncio.to_thread(self._broker.declare_queue, self.queue, ensure=True)

    def worker_argv(self, label: str, capacity: int, port: int) -> tuple[list[str], dict[str, str]]:
        import sys

        env = {
            "BENCH_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{port}/%2F",
            "BENCH_QUEUE": self.queue,
            "BENCH_THREADS": str(capacity),
        }
        if self.heartbeat != self.default_heartbeat:
            env["BENCH_HEARTBEAT"] = str(self.heartbeat)
        return [sys.executable, "-m", "benchmarks.dramatiq_app", "--threads", str(capacity)], env

    def _send(self, keys: list[str]) -> dict[str, float]:
        sent: dict[str, float] = {}
        for key in keys:
            sent[key] = time.time()
            self._actor.send(key)
        return sent

    async def submit(self, keys: list[str]) -> dict[str, float]:
        return await asyncio.to_thread(self._send, keys)

    async def submit_one(self, key: str) -> float:
        return self._send([key])[key]

    async def teardown(self) -> None:
        await super().teardown()
        with contextlib.suppress(Exception):
            self._broker.close()

    def settings(self) -> dict[str, Any]:
        return {**DRAMATIQ_SETTINGS, "heartbeat": self.heartbeat, "publish": "actor.send"}


CLASSES: dict[str, type[System]] = {
    "orchestratr": OrchestratR,
    "orchestratr-signed": OrchestratRSigned,
    "orchestratr-kinds4": OrchestratRKinds,
    "orchestratr-pg": OrchestratRPg,
    "celery": Celery,
    "dramatiq": Dramatiq,
}
