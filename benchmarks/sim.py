"""The manager and its database under many servers, with the servers simulated.

A real ``orchestratr manager`` process on a real PostgreSQL schema and the real
RabbitMQ broker; the servers are light identities, in this process or spread
over ``--processes`` worker processes, that speak the real protocol and hold
real deliveries: each consumes the jobs queue on its own channel (prefetch =
its capacity) and holds every job message it is handed, unacknowledged, as a
server does while the job runs; it numbers its heartbeats
with the servers' own :class:`~orchestratr_core.server.beats.HeartbeatSeries`
(digest, deltas, complete listings on request, the jobs it took listed as
``started``), has its own command queue bound to the commands exchange, and
obeys ``StopJob`` (drops or hands back the message). What it does not do: run
job functions, or obey ``ReleaseJobs`` (the manager runs with
``--no-rebalance``). The jobs are created through the client's batch API (rows
and messages, as in production).

Where the servers live: with ``--processes 1`` (the default) all of them are in
this process, on its connection, their heartbeats published by a thread of
their own (:class:`LocalFleet`). With ``--processes N`` they are spread in
contiguous slices over N worker processes (``python -m benchmarks.sim
--worker``), each a :class:`LocalFleet` of its slice on its own connection with
its own heartbeat thread (:class:`ProcessFleet`): one process taking every
delivery of 200 servers x 1,000 jobs and publishing their heartbeats was at its
limit. This process keeps the measurements; it asks the workers, one JSON line a
request on a worker's stdin and one JSON line its answer on its stdout, for what
it reads of the servers (complete listings acknowledged, heartbeats sent, the
longest heartbeat gap, the jobs a dying server held) and tells one server to
die. Times cross the processes as ``time.monotonic()`` (one clock for the whole
machine on Linux). The jobs are created from this process before any server
consumes. ``harness_rss_bytes`` records this process's RSS and each worker's
at the end of a size.

Progress lines with the time go to stdout while a size runs (the jobs created,
the jobs ``processing``, the events waiting for the manager, the complete
listings acknowledged after the restart, every ~15 s), then the size's figures
as one JSON line; all sizes go to ``benchmarks/results/sim.json``. The phases'
time limits grow with the size beyond 200,000 jobs. ``--backlog-wait S`` is
passed to the manager: filling a million jobs leaves it minutes behind its
events queue, and within its default cap (six server timeouts) it would
declare live servers dead.

Measured, per size (jobs spread over ``--servers`` servers, each with room for a
share of one dead server's jobs):

* steady state, every job idle: the manager's CPU (process CPU time, % of one
  core) and the database's row writes per second (``pg_stat_user_tables``) over
  a window;
* convergence after ``kill -9`` of the manager and a new one started: seconds until
  every server's complete listing was acknowledged by the new manager; and how
  many servers it declared dead and jobs it moved meanwhile (should be none);
* a server that dies (its heartbeats stop and its channel closes, so the broker
  hands its messages to the others): seconds until every one of its jobs is
  ``processing`` on another server in the database, and until its row is
  ``dead``.

``--fill-steps K`` has every server take its share in K steps, the next once
the jobs of the last are ``processing`` and the manager caught up with its
events queue; ``--step-window S`` measures the steady state after each step (a
curve over the sizes at one number of servers). A step the manager does not
catch up with ends the size there, recorded.

    .venv/bin/python -m benchmarks.sim --sizes 10000,50000,100000,200000
    .venv/bin/python -m benchmarks.sim --sizes 20000 --processes 4
    .venv/bin/python -m benchmarks.sim --sizes 300000 --per-server 300 --processes 8 \
        --window 60 --backlog-wait 1800 --fill-steps 3 --step-window 30 \
        --results sim-steps.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aio_pika
import aio_pika.abc

from benchmarks.common import AMQP, RESULTS, cpu_seconds, machine, rss_bytes
from benchmarks.scenarios import Cluster
from benchmarks.systems import OrchestratR
from orchestratr_core import protocol as p
from orchestratr_core.job import make_fence
from orchestratr_core.server.beats import HeartbeatSeries

ROOT = Path(__file__).resolve().parents[1]
"""The repository, where a worker process runs ``python -m benchmarks.sim``."""


class SimServer:
    """One simulated server: the deliveries it holds, its heartbeat series, its
    command queue."""

    def __init__(self, server_id: str, capacity: int, legacy: bool) -> None:
        self.id = server_id
        self.capacity = capacity
        self.legacy = legacy
        """Speak as a server of the previous version: every heartbeat a complete,
        unnumbered listing (and no acknowledgement expected)."""
        self.held: dict[str, tuple[p.RunningJob, aio_pika.abc.AbstractIncomingMessage]] = {}
        self.reports: list[tuple[p.RunningJob, bool]] = []
        self.changed = True
        self.started: list[str] = []
        self.series = HeartbeatSeries()
        self.silent = False
        self.due = False
        """A complete listing was asked for: the heartbeat thread sends one now."""
        self.lock = threading.Lock()
        """Held while its state changes or a heartbeat is built (the heartbeats
        are published by a thread of their own: :class:`Beats`)."""
        self.channels: list[aio_pika.abc.AbstractChannel] = []
        """Its consumers of the jobs queue: prefetch = its share, then one more
        with the room for a dead server's share (a new prefetch applies only to
        a new consumer)."""
        self.full_acked_at = 0.0
        """monotonic time its last complete listing was acknowledged"""
        self.full_seqs: set[int] = set()
        self.sent = 0
        self.sent_bytes = 0
        self.last_sent = 0.0
        self.max_gap = 0.0
        """Longest time between two of its heartbeats published (monotonic): a
        gap of a server timeout means this process starved its heartbeats, and
        the server was silent for the broker too."""
        self.duplicates = 0
        self.last_seq = 0
        self.complete_sent = 0
        self.chained_sent = 0
        """``seq`` of the last heartbeat built (reported published once it is)"""

    async def deliver(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        """Hold a job message, as a server does while the job runs. Of two
        messages of one job (the outbox relay sent it again under a new
        generation), the one with the larger fence is kept and the other dropped,
        as a server does."""
        job = p.decode_as(message.body, p.JobMessage)
        count = int(str((message.headers or {}).get("x-delivery-count", 0) or 0))
        fence = make_fence(job.generation, count)
        with self.lock:
            previous = self.held.get(job.job_id)
            if previous is not None:
                self.duplicates += 1
            keep = previous is None or previous[0].fence < fence
            if keep:
                self.held[job.job_id] = (p.RunningJob(job.job_id, fence, None, 0), message)
                self.started.append(job.job_id)
                self.changed = True
        if not keep:
            await message.ack()
        elif previous is not None:
            await previous[1].ack()

    def heartbeat(self) -> bytes:
        if self.changed:
            self.reports = [(job, False) for job, _ in self.held.values()]
            self.changed = False
        started, self.started = tuple(dict.fromkeys(self.started)), []
        numbered: dict[str, Any] = {}
        jobs: tuple[p.RunningJob, ...]
        if self.legacy:  # a server of the previous version: everything, unnumbered
            jobs = tuple(job for job, _ in self.reports)
        else:
            seq, base, jobs, gone, digest, running = self.series.next(self.reports, started)
            if not base:
                self.full_seqs.add(seq)
                self.complete_sent += 1
            self.chained_sent += self.series.chained
            numbered = {"seq": seq, "base": base, "gone": gone, "digest": digest}
            numbered["running"] = running
            numbered["chained"] = self.series.chained
            self.last_seq = seq
        hb = p.ServerHeartbeat(
            server_id=self.id,
            name=f"sim-{self.id}",
            max_workers=self.capacity,
            started_at=1_700_000_000.0,
            sent_at=time.time(),
            host="sim",
            pid=1,
            jobs=jobs,
            started=tuple(j for j in started if j in self.held),
            **numbered,
        )
        body = p.encode(hb)
        self.sent += 1
        self.sent_bytes += len(body)
        return body

    async def on_command(self, body: bytes) -> bool:
        """Apply a command; True if a complete listing is due now."""
        command = p.decode(body)
        if isinstance(command, p.StopJob):
            with self.lock:
                held = self.held.get(command.job_id)
                if held is not None and (
                    command.max_fence is None or held[0].fence <= command.max_fence
                ):
                    del self.held[command.job_id]
                    self.changed = True
                else:
                    held = None
            if held is not None:
                if command.drop:
                    await held[1].ack()
                else:
                    await held[1].reject(requeue=True)
            return False
        if not isinstance(command, p.HeartbeatAck):
            return False
        with self.lock:
            full = self.series.acknowledged(command)
        if not full and command.seq in self.full_seqs:
            self.full_acked_at = time.monotonic()
        return full


async def simulate(
    workdir: Path,
    *,
    jobs: int,
    servers: int,
    interval: float,
    window: float,
    legacy: bool,
    manager_args: list[str],
    profile: str = "",
    processes: int = 1,
    fill_steps: int = 1,
    step_window: float = 0.0,
) -> dict[str, Any]:
    per_server = jobs // servers
    total = per_server * servers
    spare = -(-per_server // max(1, servers - 1)) + 2  # room for a dead one's share
    # The phases' time limits grow with the size beyond 200,000 jobs (a million
    # take minutes where 200,000 fitted the limits of before).
    scale = max(1.0, total / 200_000)
    out: dict[str, Any] = {
        "jobs": total,
        "servers": servers,
        "interval_s": interval,
        "heartbeats": "complete listings, unnumbered (previous version)" if legacy else "deltas",
        "manager_args": manager_args,
        "harness_processes": processes,
        "fill_steps": fill_steps,
    }
    cluster = Cluster("orchestratr", workdir)
    system = cluster.system
    assert isinstance(system, OrchestratR)
    base_argv = system.manager_argv

    def manager_argv() -> list[str]:
        # At info: the leader's lines on the events frontier (how far behind it is).
        argv = ["info" if arg == "warning" else arg for arg in base_argv()]
        return [*argv, "--no-rebalance", *manager_args]

    system.manager_argv = manager_argv  # type: ignore[method-assign]
    async with cluster:
        assert system.manager is not None
        ids = [f"s{i:04d}" for i in range(servers)]
        names = Names(system.prefix, system.queue)
        connection = await aio_pika.connect(AMQP)
        fleet: Fleet
        try:
            control = await connection.channel()
            if processes <= 1:
                sims = [SimServer(i, per_server + spare, legacy) for i in ids]
                fleet = LocalFleet(connection, control, names, sims, interval)
            else:
                fleet = await ProcessFleet.spawn(
                    names, ids, per_server + spare, legacy, interval, processes
                )
            # The servers begin once the jobs exist: creating them in this same
            # process under load must not starve their heartbeats (they would be
            # declared dead before they held anything).
            _say(f"creating {total} jobs (client batch API)")
            t0 = time.monotonic()
            watch = asyncio.create_task(_watch_creates(system, total))
            try:
                await system.submit([f"job-{i:07d}" for i in range(total)])
            finally:
                watch.cancel()
            out["create_s"] = round(time.monotonic() - t0, 1)
            _say(f"created in {out['create_s']} s; {servers} servers start consuming")
            try:
                t0 = time.monotonic()  # the servers start taking their jobs now
                steps = _fill_steps(per_server, fill_steps)
                await fleet.start(steps[0])
                _say(f"{servers} servers consuming ({round(time.monotonic() - t0, 1)} s)")
                if len(steps) > 1:
                    out["fill_steps_done"] = done = await _fill_in_steps(
                        system,
                        fleet,
                        control,
                        names.events,
                        servers,
                        steps,
                        t0,
                        scale,
                        step_window,
                    )
                    if done[-1]["caught_up_s"] is None:
                        _say("the manager did not catch up with a fill step: stopped there")
                        return out
                out["first_convergence_s"] = await _all_running(system, total, t0, 900 * scale)
                _say(f"every job processing: {out['first_convergence_s']} s")
                out["outbox_empty_s"] = await _outbox_empty(system, 300 * scale)
                _say(f"outbox empty: {out['outbox_empty_s']} s")
                # The catching up after a fill grew faster than the fill (1 s at
                # 100,000 jobs, 258 s at 200,000): its limit grows with the square.
                out["settled_s"] = await _settled(
                    control, names.events, servers, 300 * scale * scale
                )
                _say(f"events queue short (manager caught up): {out['settled_s']} s")
                _say(f"steady window: 11 s + {window} s + 11 s")
                out.update(await _steady(system, fleet, window, profile))
                _say(f"manager CPU {out['manager_cpu_pct']} % of a core")
                # A job whose owner was declared dead counts an owner death: before
                # the one server that dies below, every count is a live server
                # declared dead (the manager fell behind).
                out["live_server_deaths_before_kill"] = await _deaths(system)
                out["max_heartbeat_publish_gap_s"] = round((await fleet.stats())["max_gap"], 1)
                await fleet.take(spare)  # room for a share of a dead server's jobs
                _say(f"server {ids[-1]} dies")
                out.update(await _dies(system, fleet, ids[-1], interval, 180 * scale))
                _say(
                    f"its jobs elsewhere {out['dead_server_jobs_running_elsewhere_s']} s, "
                    f"declared dead {out['dead_server_declared_dead_s']} s"
                )
                await asyncio.sleep(3)  # its owner deaths are written after its row
                counted = await _deaths(system)
                if not legacy:
                    _say("kill -9 of the manager, a new one")
                    out.update(await _restart(cluster, system, fleet, ids[:-1], total, scale))
                    _say(f"new manager converged: {out['restart_convergence_s']} s")
                    out["owner_deaths_counted_by_the_restart"] = await _deaths(system) - counted
                stats = await fleet.stats()
                out["duplicate_deliveries"] = stats["duplicates"]
                out["harness_rss_bytes"] = {
                    "coordinator": rss_bytes(os.getpid()),
                    "workers": stats["rss"],
                }
            finally:
                await fleet.stop()
        finally:
            await connection.close()
    return out


def _fill_steps(per_server: int, steps: int) -> list[int]:
    """The deliveries each server takes at each step of the fill: ``per_server``
    in ``steps`` near-equal parts (one part: all at once)."""
    steps = max(1, min(steps, per_server))
    return [per_server * (i + 1) // steps - per_server * i // steps for i in range(steps)]


async def _fill_in_steps(
    system: OrchestratR,
    fleet: Fleet,
    control: aio_pika.abc.AbstractChannel,
    events: str,
    servers: int,
    steps: list[int],
    t0: float,
    scale: float,
    window: float,
) -> list[dict[str, Any]]:
    """Every server takes its share in ``steps``: the next step once the jobs of
    the last are ``processing`` in the database and the manager caught up with
    its events queue. A fill of a million at once leaves the manager applying the
    servers' start heartbeats for longer than the fill (docs/benchmarks.md); the
    steps keep it nearer its queue. With ``window`` > 0 the steady state is
    measured after each step (as at the end: :func:`_steady`): a curve over the
    sizes at one number of servers. Each step's record: the jobs taken so far,
    the seconds from its take until every one was ``processing`` and until the
    manager caught up (``None``: not within the limit, and the fill stops
    there), and its steady state."""
    done: list[dict[str, Any]] = []
    taken, since = steps[0] * servers, t0
    limit = max(600.0, 300 * scale)
    for i, room in enumerate([*steps[1:], 0], 1):
        running = await _all_running(system, taken, since, limit)
        caught_up = await _settled(control, events, servers, limit)
        step: dict[str, Any] = {"jobs": taken, "processing_s": running, "caught_up_s": None}
        if running is not None and caught_up is not None:
            step["caught_up_s"] = round(time.monotonic() - since, 1)
        done.append(step)
        _say(
            f"fill step {i}/{len(steps)}: {taken} jobs, manager caught up ({step['caught_up_s']} s)"
        )
        if step["caught_up_s"] is None:
            break
        if window > 0:
            step.update(await _steady(system, fleet, window, ""))
            _say(f"  steady at {taken} jobs: manager CPU {step['manager_cpu_pct']} % of a core")
        if room:
            since = time.monotonic()
            await fleet.take(room)
            taken += room * servers
    return done


def _say(message: str) -> None:
    """A progress line with the time, for watching a long run."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


async def _watch_creates(system: OrchestratR, total: int, every: float = 15.0) -> None:
    """Progress of the creation: job rows written so far, every ``every`` s."""
    since = time.monotonic()
    while True:
        await asyncio.sleep(every)
        try:
            rows = int(await _scalar(system, 'SELECT count(*) FROM "{schema}".jobs'))
        except Exception as exc:  # a progress line, not a measurement
            _say(f"  (job rows not counted: {type(exc).__name__})")
            continue
        rate = rows / (time.monotonic() - since)
        _say(f"  created {rows}/{total} job rows ({rate:.0f}/s)")


@dataclass(frozen=True)
class Names:
    """The broker names a simulated server uses."""

    prefix: str
    jobs: str
    """the jobs queue"""

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def commands(self) -> str:
        return f"{self.prefix}.commands"


class Fleet(Protocol):
    """The simulated servers, in this process (:class:`LocalFleet`) or spread over
    worker processes (:class:`ProcessFleet`)."""

    async def start(self, room: int) -> None:
        """Heartbeats begin; every server's command queue; ``room`` deliveries each."""

    async def take(self, room: int) -> None:
        """Every server consumes the jobs queue with ``room`` more deliveries."""

    async def acked(self, since: float) -> tuple[int, int, float]:
        """Of the live servers: how many had a complete listing made after
        ``since`` (monotonic, system-wide on Linux) acknowledged, how many there
        are, and the latest such acknowledgement."""

    async def stats(self) -> dict[str, Any]:
        """``sent``, ``sent_bytes``, ``duplicates`` (sums), ``max_gap`` (longest
        heartbeat gap of any server), ``rss`` (each worker process's RSS)."""

    async def die(self, server_id: str) -> tuple[list[str], float]:
        """The server falls silent and closes its channels: the jobs it held and
        the monotonic time it fell silent."""

    async def stop(self) -> None:
        """Heartbeats stop; worker processes exit."""


class LocalFleet:
    """The simulated servers in this process, on ``connection``, their
    heartbeats from a thread of their own (:class:`Beats`)."""

    def __init__(
        self,
        connection: aio_pika.abc.AbstractConnection,
        control: aio_pika.abc.AbstractChannel,
        names: Names,
        sims: list[SimServer],
        interval: float,
    ) -> None:
        self.connection = connection
        self.control = control
        self.names = names
        self.sims = sims
        self.by_id = {sim.id: sim for sim in sims}
        self.beats = Beats(sims, interval, names.events)

    async def start(self, room: int) -> None:
        self.beats.start()
        commands = await self.control.get_exchange(self.names.commands)
        for sim in self.sims:
            queue = await self.control.declare_queue(
                f"{self.names.commands}.{sim.id}.sim", exclusive=True, auto_delete=True
            )
            await queue.bind(commands, routing_key=sim.id)

            async def on_command(
                message: aio_pika.abc.AbstractIncomingMessage, sim: SimServer = sim
            ) -> None:
                await message.ack()
                if sim.silent:
                    return
                if await sim.on_command(message.body):
                    sim.due = True

            await queue.consume(on_command)
            await _take_jobs(self.connection, self.names.jobs, sim, room)

    async def take(self, room: int) -> None:
        for sim in self.sims:
            await _take_jobs(self.connection, self.names.jobs, sim, room)

    async def acked(self, since: float) -> tuple[int, int, float]:
        live = [sim for sim in self.sims if not sim.silent]
        times = [sim.full_acked_at for sim in live if sim.full_acked_at > since]
        return len(times), len(live), max(times, default=0.0)

    async def stats(self) -> dict[str, Any]:
        return {
            "sent": sum(sim.sent for sim in self.sims),
            "sent_bytes": sum(sim.sent_bytes for sim in self.sims),
            "complete": sum(sim.complete_sent for sim in self.sims),
            "chained": sum(sim.chained_sent for sim in self.sims),
            "duplicates": sum(sim.duplicates for sim in self.sims),
            "max_gap": max((sim.max_gap for sim in self.sims), default=0.0),
            "rss": [],
        }

    async def die(self, server_id: str) -> tuple[list[str], float]:
        sim = self.by_id[server_id]
        with sim.lock:
            mine = list(sim.held)
            sim.silent = True
        at = time.monotonic()
        for channel in sim.channels:
            await channel.close()
        return mine, at

    async def stop(self) -> None:
        if self.beats.is_alive():
            self.beats.stop()


class ProcessFleet:
    """The simulated servers spread over worker processes (``python -m
    benchmarks.sim --worker``), each a :class:`LocalFleet` of a slice of them on
    its own connection, with its own heartbeat thread. One JSON line a request on
    a worker's stdin, one JSON line its answer on its stdout (its log goes to
    stderr)."""

    def __init__(self, workers: list[asyncio.subprocess.Process]) -> None:
        self.workers = workers
        self.locks = [asyncio.Lock() for _ in workers]
        self.owner: dict[str, int] = {}

    @classmethod
    async def spawn(
        cls,
        names: Names,
        ids: list[str],
        capacity: int,
        legacy: bool,
        interval: float,
        processes: int,
    ) -> ProcessFleet:
        count = min(processes, len(ids))
        size, extra = divmod(len(ids), count)
        slices, at = [], 0
        for w in range(count):  # contiguous slices, the first ones one larger
            n = size + (1 if w < extra else 0)
            slices.append(ids[at : at + n])
            at += n
        workers = []
        try:
            for w, mine in enumerate(slices):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    *("-m", "benchmarks.sim", "--worker"),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=str(ROOT),
                    limit=1 << 26,
                )
                workers.append(proc)
                config = {
                    "prefix": names.prefix,
                    "jobs": names.jobs,
                    "ids": mine,
                    "capacity": capacity,
                    "legacy": legacy,
                    "interval": interval,
                    "index": w,
                }
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(config).encode() + b"\n")
            fleet = cls(workers)
            for w, mine in enumerate(slices):
                fleet.owner.update(dict.fromkeys(mine, w))
            await fleet._all({"op": "ready"})
        except BaseException:
            for proc in workers:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            raise
        return fleet

    async def _ask(self, w: int, request: dict[str, Any]) -> Any:
        proc = self.workers[w]
        assert proc.stdin is not None and proc.stdout is not None
        async with self.locks[w]:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            await proc.stdin.drain()
            line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"sim worker {w} exited ({await proc.wait()}) at {request['op']}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"sim worker {w}: {answer['error']}")
        return answer["result"]

    async def _all(self, request: dict[str, Any]) -> list[Any]:
        return list(
            await asyncio.gather(*(self._ask(w, request) for w in range(len(self.workers))))
        )

    async def start(self, room: int) -> None:
        await self._all({"op": "start", "room": room})

    async def take(self, room: int) -> None:
        await self._all({"op": "take", "room": room})

    async def acked(self, since: float) -> tuple[int, int, float]:
        answers = await self._all({"op": "acked", "since": since})
        return (
            sum(a[0] for a in answers),
            sum(a[1] for a in answers),
            max(a[2] for a in answers),
        )

    async def stats(self) -> dict[str, Any]:
        answers = await self._all({"op": "stats"})
        return {
            "sent": sum(a["sent"] for a in answers),
            "sent_bytes": sum(a["sent_bytes"] for a in answers),
            "complete": sum(a["complete"] for a in answers),
            "chained": sum(a["chained"] for a in answers),
            "duplicates": sum(a["duplicates"] for a in answers),
            "max_gap": max(a["max_gap"] for a in answers),
            "rss": [a["rss"][0] for a in answers],
        }

    async def die(self, server_id: str) -> tuple[list[str], float]:
        mine, at = await self._ask(self.owner[server_id], {"op": "die", "id": server_id})
        return list(mine), float(at)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._all({"op": "stop"}), 60)
        for proc in self.workers:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()


async def worker_main() -> None:
    """A worker process of :class:`ProcessFleet`: its configuration on the first
    line of stdin, then requests, one a line, each answered on stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    config = json.loads(await reader.readline())
    names = Names(config["prefix"], config["jobs"])
    sims = [SimServer(i, config["capacity"], config["legacy"]) for i in config["ids"]]
    connection = await aio_pika.connect(AMQP)
    fleet = LocalFleet(connection, await connection.channel(), names, sims, config["interval"])
    out = sys.stdout.buffer
    try:
        while line := await reader.readline():
            request = json.loads(line)
            op = request["op"]
            try:
                result: Any = None
                if op == "start":
                    await fleet.start(request["room"])
                elif op == "take":
                    await fleet.take(request["room"])
                elif op == "acked":
                    result = await fleet.acked(request["since"])
                elif op == "stats":
                    result = {**await fleet.stats(), "rss": [rss_bytes(os.getpid())]}
                elif op == "die":
                    result = await fleet.die(request["id"])
                elif op == "stop":
                    await fleet.stop()
                answer: dict[str, Any] = {"result": result}
            except Exception as exc:
                traceback.print_exc()
                answer = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            out.write(json.dumps(answer).encode() + b"\n")
            out.flush()
            if op == "stop":
                break
    finally:
        await fleet.stop()
        await connection.close()


class Beats(threading.Thread):
    """Publishes the simulated servers' heartbeats from a thread with its own
    event loop and connection, spread over the interval as real servers' are:
    the main loop, busy taking tens of thousands of deliveries, starved them
    (at 50,000 jobs a server went 8.9 s without a heartbeat, at 100,000 beyond
    the manager's server timeout -- servers silent for the broker too)."""

    def __init__(self, sims: list[SimServer], interval: float, queue: str) -> None:
        super().__init__(name="sim-heartbeats", daemon=True)
        self.sims = sims
        self.interval = interval
        self.queue = queue
        self.stopping = threading.Event()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        connection = await aio_pika.connect(AMQP)
        try:
            channel = await connection.channel()
            gap = self.interval / len(self.sims)
            while not self.stopping.is_set():
                for sim in self.sims:
                    started = time.monotonic()
                    for due in self.sims:  # complete listings asked for go first
                        if due.due:
                            due.due = False
                            await self._publish(channel, due)
                    await self._publish(channel, sim)
                    if self.stopping.is_set():
                        return
                    await asyncio.sleep(max(0.0, gap - (time.monotonic() - started)))
        finally:
            await connection.close()

    async def _publish(self, channel: aio_pika.abc.AbstractChannel, sim: SimServer) -> None:
        with sim.lock:
            if sim.silent:
                return
            body = sim.heartbeat()
        message = aio_pika.Message(
            body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await channel.default_exchange.publish(message, self.queue)
        with sim.lock:
            if not sim.legacy:
                sim.series.sent(sim.last_seq)  # the next may be chained on it
        now = time.monotonic()
        if sim.last_sent:
            sim.max_gap = max(sim.max_gap, now - sim.last_sent)
        sim.last_sent = now


async def _take_jobs(
    connection: aio_pika.abc.AbstractConnection, queue: str, sim: SimServer, room: int
) -> None:
    """Consume the jobs queue for ``sim`` with ``room`` more deliveries."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=room)
    jobs_queue = await channel.get_queue(queue, ensure=False)

    async def on_job(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await sim.deliver(message)

    await jobs_queue.consume(on_job)
    sim.channels.append(channel)


async def _scalar(system: OrchestratR, sql: str, *args: Any) -> Any:
    pool = system._storage.connector._pool
    async with pool.acquire() as conn:
        return await conn.fetchval(sql.format(schema=system.schema), *args)


async def _deaths(system: OrchestratR) -> int:
    """Jobs with an owner death (or any failure) counted."""
    return int(await _scalar(system, 'SELECT count(*) FROM "{schema}".jobs WHERE failure_seq > 0'))


async def _outbox_empty(system: OrchestratR, within: float) -> float | None:
    """Seconds until the outbox is empty (creates whose publish confirm came late
    are re-sent by the leader's relay: not part of the steady state)."""
    since = time.monotonic()
    while time.monotonic() - since < within:
        if not await _scalar(system, 'SELECT count(*) FROM "{schema}".outbox'):
            return round(time.monotonic() - since, 1)
        await asyncio.sleep(0.5)
    return None


async def _all_running(
    system: OrchestratR, total: int, since: float, within: float
) -> float | None:
    """Seconds from ``since`` until the database shows every job ``processing``."""
    said = time.monotonic()
    while time.monotonic() - since < within:
        running = await _scalar(
            system, "SELECT count(*) FROM \"{schema}\".jobs WHERE status = 'processing'"
        )
        if running >= total:
            return round(time.monotonic() - since, 1)
        if time.monotonic() - said >= 15:
            said = time.monotonic()
            _say(f"  {running}/{total} jobs processing ({round(said - since)} s)")
        await asyncio.sleep(0.5)
    return None


async def _converged(fleet: Fleet, since: float, within: float) -> float | None:
    """Seconds from ``since`` until every live server's complete listing made
    after it was acknowledged."""
    deadline = time.monotonic() + within
    said = time.monotonic()
    while time.monotonic() < deadline:
        acked, live, latest = await fleet.acked(since)
        if acked == live:
            return round(latest - since, 2)
        if time.monotonic() - said >= 15:
            said = time.monotonic()
            _say(f"  {acked}/{live} complete listings acknowledged ({round(said - since)} s)")
        await asyncio.sleep(0.05)
    return None


async def _settled(
    channel: aio_pika.abc.AbstractChannel, queue: str, servers: int, within: float
) -> float | None:
    """Seconds until the manager keeps up: the events queue held fewer messages
    than there are servers at three checks in a row (a backlog makes the
    manager's copies stale, and the steady state would measure the catching up)."""
    started = said = time.monotonic()
    quiet = 0
    while time.monotonic() - started < within:
        depth = (await channel.declare_queue(queue, passive=True)).declaration_result
        waiting = int(depth.message_count or 0)
        quiet = quiet + 1 if waiting < servers else 0
        if quiet >= 3:
            return round(time.monotonic() - started, 1)
        if time.monotonic() - said >= 15:
            said = time.monotonic()
            _say(f"  {waiting} events wait for the manager ({round(said - started)} s)")
        await asyncio.sleep(0.5)
    return None


async def _writes(system: OrchestratR) -> dict[str, int]:
    pool = system._storage.connector._pool
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del AS w "
            "FROM pg_stat_user_tables WHERE schemaname = $1",
            system.schema,
        )
    return {row["relname"]: int(row["w"]) for row in rows}


async def _steady(system: OrchestratR, fleet: Fleet, window: float, profile: str) -> dict[str, Any]:
    assert system.manager is not None
    pid = system.manager.pid
    spy: asyncio.subprocess.Process | None = None
    # A backend flushes its statistics at most once a second, and an idle one up
    # to 10 s later (PostgreSQL 15+): the creates' writes must be counted before.
    await asyncio.sleep(11)
    w0, c0, t0 = await _writes(system), cpu_seconds(pid), time.monotonic()
    stats0 = await fleet.stats()
    if profile:  # sampled from outside, without pausing the manager
        spy = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("py-spy")),
            *("record", "--nonblocking", "-r", "100", "-f", "raw", "-p", str(pid)),
            *("-d", str(int(window)), "-o", profile),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    await asyncio.sleep(window)
    c1, t1 = cpu_seconds(pid), time.monotonic()
    if spy is not None:
        await spy.wait()
    stats1 = await fleet.stats()
    await asyncio.sleep(11)
    # Rows written between the two reads of the statistics (both lag alike).
    w1, t2 = await _writes(system), time.monotonic()
    wall = t1 - t0
    per_table = {k: round((w1.get(k, 0) - w0.get(k, 0)) / (t2 - t0), 1) for k in w1}
    return {
        "manager_cpu_pct": round(100 * (c1 - c0) / wall, 1),
        "manager_rss_bytes": rss_bytes(pid),
        "db_row_writes_per_s": per_table,
        "heartbeats_per_s": round((stats1["sent"] - stats0["sent"]) / wall, 1),
        "heartbeat_bytes_per_s": round((stats1["sent_bytes"] - stats0["sent_bytes"]) / wall),
        "complete_listings_per_s": round((stats1["complete"] - stats0["complete"]) / wall, 1),
        "chained_per_s": round((stats1["chained"] - stats0["chained"]) / wall, 1),
        "window_s": round(wall, 1),
    }


async def _restart(
    cluster: Cluster,
    system: OrchestratR,
    fleet: Fleet,
    live: list[str],
    total: int,
    scale: float,
) -> dict[str, Any]:
    """``kill -9`` the manager, start a new one: seconds until it acknowledged
    every live server's complete listing (it lacks their sets, so it asks each);
    and whether it declared any of ``live`` dead or left any job not
    ``processing`` meanwhile."""
    assert system.manager is not None
    cluster.procs.kill9(system.manager)
    await asyncio.sleep(0.5)
    started = time.monotonic()
    system.manager = system.procs.python(f"{system.prefix}-manager2", system.manager_argv())
    converged = await _converged(fleet, started, 600 * scale)
    await asyncio.sleep(1.0)
    dead = await _scalar(
        system,
        "SELECT count(*) FROM \"{schema}\".servers WHERE status <> 'alive' "
        "AND id = ANY($1::text[])",
        live,
    )
    running = await _scalar(
        system, "SELECT count(*) FROM \"{schema}\".jobs WHERE status = 'processing'"
    )
    return {
        "restart_convergence_s": converged,
        "restart_note": "from spawning the new manager",
        "restart_servers_not_alive": dead,
        "restart_jobs_not_processing": total - running,
    }


async def _dies(
    system: OrchestratR, fleet: Fleet, server_id: str, interval: float, within: float
) -> dict[str, Any]:
    """One server dies: its heartbeats stop and its channel closes (the broker
    hands its messages to the others). Seconds until every one of its jobs is
    ``processing`` on another server in the database, and until its row is
    ``dead``."""
    mine, at = await fleet.die(server_id)
    moved_s = dead_s = None
    while time.monotonic() - at < within and (moved_s is None or dead_s is None):
        if moved_s is None:
            moved = await _scalar(
                system,
                'SELECT count(*) FROM "{schema}".jobs WHERE id = ANY($1::text[]) '
                "AND status = 'processing' AND server_id <> $2",
                mine,
                server_id,
            )
            if moved == len(mine):
                moved_s = round(time.monotonic() - at, 2)
        if dead_s is None:
            status = await _scalar(
                system, 'SELECT status FROM "{schema}".servers WHERE id = $1', server_id
            )
            if status == "dead":
                dead_s = round(time.monotonic() - at, 2)
        await asyncio.sleep(0.1)
    return {
        "dead_server_jobs": len(mine),
        "dead_server_jobs_running_elsewhere_s": moved_s,
        "dead_server_declared_dead_s": dead_s,
        "dead_server_note": f"server heartbeat {interval} s; the others report a job "
        "they took in their next heartbeat",
    }


async def main_async(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="orx-sim-"))
    runs = []
    for size in sizes:
        _say(f"{size} jobs")
        manager_args = args.manager_args.split()
        if args.backlog_wait is not None:
            manager_args += ["--backlog-wait", str(args.backlog_wait)]
        try:
            servers = args.servers or max(1, size // args.per_server)
            result = await simulate(
                work,
                jobs=size,
                servers=servers,
                interval=args.interval,
                window=args.window,
                legacy=args.legacy,
                manager_args=manager_args,
                profile=args.profile and f"{args.profile}-{size}.txt",
                processes=args.processes,
                fill_steps=args.fill_steps,
                step_window=args.step_window,
            )
        except Exception as exc:  # recorded, not raised: the next size may still fit
            traceback.print_exc()
            result = {"jobs": size, "error": f"{type(exc).__name__}: {exc}"[:500]}
        print(json.dumps(result), flush=True)
        runs.append(result)
    doc = {
        "what": __doc__.splitlines()[0] if __doc__ else "",
        "command": " ".join(["python -m benchmarks.sim", *sys.argv[1:]]),
        "machine": machine(),
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.results or ("sim-legacy.json" if args.legacy else "sim.json")
    (RESULTS / name).write_text(json.dumps(doc, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--sizes", default="100000", help="jobs per run, comma-separated")
    parser.add_argument("--servers", type=int, default=0, help="0: jobs / --per-server")
    parser.add_argument("--per-server", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=2.0, help="server heartbeat (s)")
    parser.add_argument("--window", type=float, default=30.0, help="steady-state window (s)")
    parser.add_argument(
        "--legacy", action="store_true", help="servers of the previous version (complete listings)"
    )
    parser.add_argument(
        "--manager-args",
        default="",
        help="more `orchestratr manager` options, e.g. '--seen-batch 0'",
    )
    parser.add_argument(
        "--backlog-wait",
        type=float,
        default=None,
        metavar="S",
        help="the manager's --backlog-wait (default: the manager's own, six server timeouts)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="spread the simulated servers over N worker processes (1: all in this one)",
    )
    parser.add_argument(
        "--fill-steps",
        type=int,
        default=1,
        metavar="K",
        help="each server takes its share in K steps, the next once the manager caught up "
        "(1: all at once)",
    )
    parser.add_argument(
        "--step-window",
        type=float,
        default=0.0,
        metavar="S",
        help="with --fill-steps: measure the steady state for S seconds after each step",
    )
    parser.add_argument(
        "--results",
        default="",
        metavar="NAME",
        help="file under benchmarks/results (default: sim.json, sim-legacy.json with --legacy)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile",
        default="",
        help="py-spy the manager over the window into PATH-<jobs>.txt (collapsed stacks)",
    )
    args = parser.parse_args()
    asyncio.run(worker_main() if args.worker else main_async(args))


if __name__ == "__main__":
    main()
