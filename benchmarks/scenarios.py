"""The six benchmark scenarios. Each function runs one system once (a fresh
namespace and fresh processes) and returns raw figures; ``run.py`` repeats,
aggregates and writes the JSON."""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BROKER_PORT,
    Ledger,
    Proc,
    Procs,
    cpu_seconds,
    rss_bytes,
    run_id,
)
from benchmarks.systems import CLASSES, OrchestratR, System


class Cluster:
    """One system, its workers and its ledger, for one measurement."""

    def __init__(self, name: str, workdir: Path, *, heartbeat: int | None = None, **kw: Any):
        self.tag = run_id()
        self.workdir = workdir / f"{name}-{self.tag}"
        self.workdir.mkdir(parents=True)
        self.procs = Procs(self.workdir)
        self.ledger = Ledger(self.workdir / "ledger")
        self.system: System = CLASSES[name](
            self.procs, self.ledger.directory, f"bench-{self.tag}", heartbeat=heartbeat, **kw
        )
        self.proxies: dict[str, Proc] = {}

    async def __aenter__(self) -> Cluster:
        try:
            await self.system.setup()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            await self.system.teardown()
        finally:
            self.procs.close()

    async def proxy(self, label: str) -> int:
        """Start a silent proxy process for one worker; returns its port."""
        import sys

        proc = self.procs.spawn(
            f"proxy-{label}",
            [sys.executable, "-m", "benchmarks.proxy", "--upstream", f"127.0.0.1:{BROKER_PORT}"],
        )
        deadline = time.monotonic() + 30
        while "port " not in proc.text():
            if time.monotonic() > deadline or not proc.alive:
                raise RuntimeError(f"proxy did not start: {proc.text()}")
            await asyncio.sleep(0.05)
        self.proxies[label] = proc
        return int(proc.text().split("port ", 1)[1].split()[0])

    async def start_workers(
        self, count: int, capacity: int, *, proxied: bool = False
    ) -> list[Proc]:
        out = []
        for i in range(count):
            label = f"w{i + 1}"
            port = await self.proxy(label) if proxied else BROKER_PORT
            out.append(await self.system.start_worker(label, capacity, port=port))
        return out

    async def wait_running(self, keys: list[str], within: float) -> float:
        """Wait until every key has started once; the time of the last start."""
        wanted = set(keys)
        deadline = time.monotonic() + within
        while True:
            self.ledger.poll()
            missing = wanted - self.ledger.first_start.keys()
            if not missing:
                return max(self.ledger.first_start[k] for k in wanted)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(missing)} of {len(wanted)} jobs not started after {within:g} s; "
                    f"{len(self.ledger.copies)} starts of {len(self.ledger.first_start)} "
                    f"distinct jobs (a job started again after its worker gave it up)"
                    + self.fence_note()
                )
            await asyncio.sleep(0.05)

    def fence_note(self) -> str:
        """OrchestratR: how often its servers gave all their jobs up (fence, loss)."""
        lost = [
            line.split("msg=", 1)[-1][:160]
            for proc in self.system.workers
            for line in proc.text().splitlines()
            if "session lost" in line
        ]
        return f"; {len(lost)} session losses in the servers, e.g. {lost[0]}" if lost else ""

    def holdings(self, workers: list[Proc]) -> dict[int, set[str]]:
        self.ledger.poll()
        running = self.ledger.running()
        pids = {w.pid for w in workers}
        out: dict[int, set[str]] = {pid: set() for pid in pids}
        for key, copy in running.items():
            if copy.pid in out:
                out[copy.pid].add(key)
        return out


def keys_for(n: int, prefix: str = "job") -> list[str]:
    return [f"{prefix}-{i:06d}" for i in range(n)]


async def _wait_moved(
    cluster: Cluster, keys: set[str], since: float, dead: int, within: float
) -> dict[str, float]:
    """Wait until every key started again after ``since`` outside process ``dead``."""
    deadline = time.monotonic() + within
    while True:
        cluster.ledger.poll()
        moved = cluster.ledger.started_after(since, exclude_pids={dead})
        got = {k: moved[k] for k in keys if k in moved}
        if len(got) == len(keys) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.02)


async def _settled(cluster: Cluster, keys: list[str], *, within: float, quiet: float = 2.0) -> None:
    """Wait (at most ``within`` seconds) until every job runs exactly once and no
    copy started for ``quiet`` seconds. Under load OrchestratR's outbox relay may
    send a job's message again under a new generation when its creator confirmed
    the first one late (docs/benchmarks.md); the newer copy supersedes the older
    within moments. A kill before that measures the clean-up of the duplicates
    with the failover: a job whose newer copy runs elsewhere never starts again."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        cluster.ledger.poll()
        counts = cluster.ledger.open_counts()
        last = max((c.start for c in cluster.ledger.copies), default=0.0)
        if all(counts.get(k) == 1 for k in keys) and time.time() - last >= quiet:
            return
        await asyncio.sleep(0.2)


def _cpu_watched(cluster: Cluster, survivors: list[Proc]) -> dict[str, int]:
    """The processes whose CPU a failover is measured by: the surviving workers,
    the system's manager if it has one."""
    watched = {f"survivor-{i + 1}": proc.pid for i, proc in enumerate(survivors)}
    manager = getattr(cluster.system, "manager", None)
    if isinstance(manager, Proc) and manager.alive:
        watched["manager"] = manager.pid
    return watched


def _cpu_of(watched: dict[str, int]) -> dict[str, float]:
    out = {}
    for label, pid in watched.items():
        with contextlib.suppress(OSError):
            out[label] = cpu_seconds(pid)
    return out


async def failover(
    name: str, workdir: Path, *, per_worker: int, partition: bool = False,
    heartbeat: int | None = None, within: float = 120.0,
) -> dict[str, Any]:  # fmt: skip
    """Scenarios 1 and 2: four workers with ``per_worker`` jobs each; kill -9 (or
    silently partition) the one holding the most; time until its jobs all run
    again elsewhere. With ``partition`` also count second copies: a job whose old
    copy was still running when its new copy started."""
    capacity = math.ceil(per_worker * 1.5)
    async with Cluster(name, workdir, heartbeat=heartbeat) as cluster:
        workers = await cluster.start_workers(4, capacity, proxied=partition)
        keys = keys_for(4 * per_worker)
        await cluster.system.submit(keys)
        await cluster.wait_running(keys, within=180)
        await asyncio.sleep(2.0)  # let every start settle
        await _settled(cluster, keys, within=90)
        held = cluster.holdings(workers)
        victim = max(workers, key=lambda w: len(held[w.pid]))
        victim_keys = held[victim.pid]
        watched = _cpu_watched(cluster, [w for w in workers if w is not victim])
        cpu_before = _cpu_of(watched)
        if partition:
            at = time.time()
            proxy = cluster.proxies[f"w{workers.index(victim) + 1}"]
            proxy.popen.send_signal(signal.SIGUSR1)
        else:
            at = cluster.procs.kill9(victim)
        moved = await _wait_moved(cluster, victim_keys, at, victim.pid, within)
        cpu_after = _cpu_of(watched)
        out: dict[str, Any] = {
            "jobs_on_victim": len(victim_keys),
            "per_worker": {str(pid): len(ks) for pid, ks in held.items()},
            "moved": len(moved),
            "all_moved": len(moved) == len(victim_keys),
            "per_job_s": sorted(t - at for t in moved.values()),
            "total_s": (max(moved.values()) - at) if len(moved) == len(victim_keys) else None,
            # CPU seconds each process used from the kill until the last job moved
            # (+ up to 20 ms of polling; clock ticks of 10 ms): where the time went.
            "cpu_s_in_window": {
                label: round(cpu_after[label] - cpu_before[label], 3)
                for label in cpu_before
                if label in cpu_after
            },
        }
        if partition:
            await asyncio.sleep(3.0)  # give a stale copy every chance to show itself
            observed_until = time.time()
            cluster.ledger.poll()
            old = {c.key: c for c in cluster.ledger.copies if c.pid == victim.pid}
            overlaps = []
            for key, started in moved.items():
                copy = old.get(key)
                if copy is None:
                    continue
                end = copy.end if copy.end is not None else observed_until
                if end > started:
                    overlaps.append(end - started)
            stops = [c.end - at for c in old.values() if c.end is not None]
            out.update(
                second_copies=len(overlaps),
                overlap_s=sorted(overlaps),
                old_copies_still_running=sum(1 for c in old.values() if c.end is None),
                old_copies_stop_s=sorted(stops),
                observed_s=observed_until - at,
            )
        if victim.alive:
            cluster.procs.kill9(victim)
        return out


async def latency(name: str, workdir: Path, *, samples: int, gap: float = 0.02) -> list[float]:
    """Scenario 3: submit one job at a time to an idle worker; seconds from the
    submit call to the job function's first line."""
    async with Cluster(name, workdir) as cluster:
        await cluster.start_workers(1, samples + 10)
        warm = keys_for(5, "warm")
        for key in warm:
            await cluster.system.submit_one(key)
        await cluster.wait_running(warm, within=30)
        out = []
        for key in keys_for(samples, "lat"):
            await asyncio.sleep(gap)
            t0 = await cluster.system.submit_one(key)
            deadline = time.monotonic() + 30
            while key not in cluster.ledger.first_start:
                cluster.ledger.poll()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{key} never started")
                await asyncio.sleep(0.0005)
            out.append(cluster.ledger.first_start[key] - t0)
        return out


async def throughput(
    name: str, workdir: Path, *, jobs: int, workers: int = 4, within: float = 900.0,
    manager_cpu_window: float = 0.0, footprint_window: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    """Scenario 4 (and 5/6 on the same cluster when asked): create ``jobs`` jobs
    on ``workers`` workers; seconds from the first submission to the last first
    line. Then, optionally, CPU of the manager and of the workers while idle."""
    capacity = math.ceil(jobs / workers * 1.1) + 10
    async with Cluster(name, workdir) as cluster:
        empty_rss = None
        if footprint_window:
            # The same worker with room for one job: what a worker costs before
            # any per-job cost (Dramatiq starts all its threads up front, so an
            # idle worker of full capacity already holds most of its per-job memory).
            empty = await cluster.system.start_worker("empty", 1)
            await asyncio.sleep(2.0)
            empty_rss = rss_bytes(empty.pid)
            cluster.procs.stop(empty, timeout=0)
            cluster.system.workers.remove(empty)
            await asyncio.sleep(1.0)
        procs = await cluster.start_workers(workers, capacity)
        await asyncio.sleep(2.0)
        base_rss = {p.pid: rss_bytes(p.pid) for p in procs}
        keys = keys_for(jobs)
        t0 = time.time()
        sent = await cluster.system.submit(keys)
        submitted = time.time() - t0
        last = await cluster.wait_running(keys, within=within)
        out: dict[str, Any] = {
            "jobs": jobs,
            "workers": workers,
            "capacity_per_worker": capacity,
            "submit_s": submitted,
            "all_running_s": last - min(sent.values()),
        }
        if footprint_window:
            await asyncio.sleep(5.0)
            rss = {p.pid: rss_bytes(p.pid) for p in procs}
            held = cluster.holdings(procs)
            out["rss_delta_per_job_bytes"] = sum(rss[p] - base_rss[p] for p in rss) / jobs
            assert empty_rss is not None
            out["rss_per_job_bytes"] = sum(rss[p] - empty_rss for p in rss) / jobs
            out["rss_empty_worker_bytes"] = empty_rss
            out["rss_base_bytes"] = list(base_rss.values())
            out["rss_loaded_bytes"] = list(rss.values())
            out["held"] = [len(held[p.pid]) for p in procs]
            cpu0 = {p.pid: cpu_seconds(p.pid) for p in procs}
            # On PostgreSQL alone the broker is PostgreSQL: the CPU of the backends
            # serving the transport's sessions is the database load of idle jobs.
            backends = getattr(cluster.system, "transport_backend_pids", None)
            db_pids = await backends() if backends is not None else []
            db0 = {pid: cpu_seconds(pid) for pid in db_pids}
            w0 = time.monotonic()
            await asyncio.sleep(footprint_window)
            wall = time.monotonic() - w0
            out["idle_cpu_pct_per_worker"] = [
                100 * (cpu_seconds(p.pid) - cpu0[p.pid]) / wall for p in procs
            ]
            out["idle_cpu_pct_total"] = sum(out["idle_cpu_pct_per_worker"])
            if db_pids:
                out["idle_db_cpu_pct"] = sum(
                    100 * (cpu_seconds(pid) - db0[pid]) / wall for pid in db_pids
                )
                out["db_sessions"] = len(db_pids)
        if manager_cpu_window and isinstance(cluster.system, OrchestratR):
            manager = cluster.system.manager
            assert manager is not None
            # Measure at steady state: first let the manager work off the start
            # reports of the allocation (its view catches up with reality).
            t_caught = time.monotonic()
            caught_up = await _drain(f"{cluster.system.prefix}.events", within)
            out["manager_caught_up_s"] = (time.monotonic() - t_caught) if caught_up else None
            await asyncio.sleep(3.0)
            c0, w0 = cpu_seconds(manager.pid), time.monotonic()
            await asyncio.sleep(manager_cpu_window)
            wall = time.monotonic() - w0
            out["manager_cpu_pct"] = 100 * (cpu_seconds(manager.pid) - c0) / wall
            out["manager_rss_bytes"] = rss_bytes(manager.pid)
        return out


async def _drain(queue: str, within: float) -> bool:
    """Wait until ``queue`` has had no ready message for 3 s in a row."""
    import aio_pika

    from benchmarks.common import AMQP

    connection = await aio_pika.connect(AMQP)
    try:
        channel = await connection.channel()
        deadline = time.monotonic() + within
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            result = await channel.channel.queue_declare(queue, passive=True)
            if int(result.message_count or 0) == 0:  # type: ignore[union-attr]
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= 3.0:
                    return True
            else:
                quiet_since = None
            await asyncio.sleep(0.5)
        return False
    finally:
        await connection.close()


async def manager_sim(
    workdir: Path, *, jobs: int, servers: int = 4, interval: float = 2.0, window: float = 60.0,
    warmup: float = 20.0,
) -> dict[str, Any]:  # fmt: skip
    """Scenario 6 with the servers simulated: ``jobs`` rows running on ``servers``
    servers in PostgreSQL (loaded with ``sql_storage.py``'s COPY loader), and every
    ``interval`` s one heartbeat message per server listing its jobs (what a real
    server sends; each job's last ``heartbeat()`` within the last 10 s), published
    to the events queue. Measures the manager process's CPU and whether it keeps up
    (the events queue's depth at the start and the end of the window)."""
    import re

    import aio_pika

    from benchmarks.common import AMQP
    from benchmarks.sql_storage import _heartbeats, _load
    from orchestratr_core.protocol import encode

    per_server = jobs // servers
    async with Cluster("orchestratr", workdir) as cluster:
        system = cluster.system
        assert isinstance(system, OrchestratR) and system.manager is not None
        ids = await _load(system._storage, system.schema, jobs, jobs, per_server)
        bodies = []
        marker = 1234567890.25
        for beat in _heartbeats(ids, servers, per_server, 0):
            now = time.time()
            jobs_ = tuple(
                type(j)(j.job_id, j.fence, now - (i % 100) / 10, j.restarts)
                for i, j in enumerate(beat.jobs)
            )
            bodies.append(encode(type(beat)(**{**beat.__dict__, "sent_at": marker, "jobs": jobs_})))
        pattern = re.compile(rb'"sent_at":1234567890\.25')
        queue = f"{system.prefix}.events"
        connection = await aio_pika.connect(AMQP)
        published = 0
        try:
            channel = await connection.channel(publisher_confirms=True)

            async def depth() -> int:
                result = await channel.channel.queue_declare(queue, passive=True)
                return int(result.message_count or 0)  # type: ignore[union-attr]

            async def beat_loop(until: float) -> None:
                nonlocal published
                while time.monotonic() < until:
                    t0 = time.monotonic()
                    stamp = f'"sent_at":{time.time():.6f}'.encode()
                    messages = [
                        aio_pika.Message(
                            pattern.sub(stamp, body),
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        )
                        for body in bodies
                    ]
                    await asyncio.gather(
                        *(channel.default_exchange.publish(m, queue) for m in messages)
                    )
                    published += len(bodies)
                    await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))

            pid = system.manager.pid
            sender = asyncio.create_task(beat_loop(time.monotonic() + warmup + window))
            await asyncio.sleep(warmup)
            d0, c0, w0 = await depth(), cpu_seconds(pid), time.monotonic()
            await asyncio.sleep(window)
            d1, c1, w1 = await depth(), cpu_seconds(pid), time.monotonic()
            await sender
            wall = w1 - w0
            return {
                "jobs": jobs,
                "servers": servers,
                "server_heartbeat_interval_s": interval,
                "job_entries_offered_per_s": jobs / interval,
                "manager_cpu_pct": 100 * (c1 - c0) / wall,
                "manager_rss_bytes": rss_bytes(pid),
                "events_backlog_start": d0,
                "events_backlog_end": d1,
                "backlog_growth_per_min": (d1 - d0) * 60 / wall,
                "keeps_up": d1 <= max(d0, servers),
                "heartbeat_messages_published": published,
                "message_bytes": len(bodies[0]),
            }
        finally:
            await connection.close()
