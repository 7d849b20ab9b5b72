"""The manager and its database under many servers, with the servers simulated.

A real ``orchestratr manager`` process on a real PostgreSQL schema and the real
RabbitMQ broker; the servers are light identities in this one process that speak
the real protocol: each has its own command queue bound to the commands exchange
(as a server's is), publishes numbered heartbeats with the digest of its jobs to
the events queue, answers an acknowledgement by sending deltas on it and a request
for a complete listing by sending one at once. What they do not do: hold the job
messages or run job functions -- the job rows are loaded into the database as
running on them (``sql_storage.py``'s COPY loader), as ``manager_sim`` does.

Measured, per size (jobs spread evenly over ``--servers`` servers):

* steady state, every job idle: the manager's CPU (% of one core) and the
  database's row writes per second (``pg_stat_user_tables``) over a window;
* convergence after ``kill -9`` of the manager and a new one started: seconds until
  every server's complete listing was acknowledged by the new manager;
* a server that falls silent: seconds until the database shows it dead and its
  jobs pending (where the broker then hands their messages to live servers).

    .venv/bin/python -m benchmarks.sim --sizes 100000,200000,400000   # 1,000 jobs a server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aio_pika

from benchmarks.common import AMQP, RESULTS, cpu_seconds, machine, rss_bytes
from benchmarks.scenarios import Cluster
from benchmarks.systems import OrchestratR
from orchestratr_core import protocol as p


class SimServer:
    """One simulated server: its jobs, its heartbeat series, its command queue."""

    def __init__(self, server_id: str, job_ids: list[str], fence: int, legacy: bool) -> None:
        self.id = server_id
        self.legacy = legacy
        """Speak as a server of the previous version: every heartbeat a complete,
        unnumbered listing (and no acknowledgement expected)."""
        self.jobs = tuple(p.RunningJob(job_id, fence, None, 0) for job_id in job_ids)
        self.digest = p.jobs_digest(p.job_digest(job_id, fence) for job_id in job_ids)
        self.seq = 0
        self.base = 0
        self.silent = False
        self.full_acked_at = 0.0
        """monotonic time its last complete listing was acknowledged"""
        self.full_seqs: set[int] = set()
        self.sent = 0
        self.sent_bytes = 0

    def heartbeat(self) -> bytes:
        self.seq += 1
        full = self.legacy or not self.base
        if full:
            self.full_seqs.add(self.seq)
        numbered: dict[str, Any] = {}
        if not self.legacy:  # a server of the previous version leaves these out
            numbered = {
                "seq": self.seq,
                "base": self.base,
                "digest": self.digest,
                "running": len(self.jobs),
            }
        hb = p.ServerHeartbeat(
            server_id=self.id,
            name=f"sim-{self.id}",
            max_workers=len(self.jobs) + 10,
            started_at=1_700_000_000.0,
            sent_at=time.time(),
            host="sim",
            pid=1,
            jobs=self.jobs if full else (),
            **numbered,
        )
        body = p.encode(hb)
        self.sent += 1
        self.sent_bytes += len(body)
        return body

    def on_command(self, body: bytes) -> bool:
        """Apply a command; True if a complete listing is due now."""
        command = p.decode(body)
        if not isinstance(command, p.HeartbeatAck):
            return False
        if command.full:
            self.base = 0
            return True
        if command.seq > self.base:
            self.base = command.seq
            if command.seq in self.full_seqs:
                self.full_acked_at = time.monotonic()
        return False


async def simulate(
    workdir: Path, *, jobs: int, servers: int, interval: float, window: float, legacy: bool
) -> dict[str, Any]:
    from benchmarks.sql_storage import _load

    per_server = jobs // servers
    out: dict[str, Any] = {
        "jobs": per_server * servers,
        "servers": servers,
        "interval_s": interval,
        "heartbeats": "complete listings, unnumbered (previous version)" if legacy else "deltas",
    }
    async with Cluster("orchestratr", workdir) as cluster:
        system = cluster.system
        assert isinstance(system, OrchestratR) and system.manager is not None
        t0 = time.monotonic()
        ids = await _load(system._storage, system.schema, jobs, per_server * servers, per_server)
        out["load_s"] = round(time.monotonic() - t0, 1)
        sims = [
            SimServer(f"s{i:03d}", ids[i * per_server : (i + 1) * per_server], 1 << 32, legacy)
            for i in range(servers)
        ]
        connection = await aio_pika.connect(AMQP)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1000)
            commands = await channel.get_exchange(f"{system.prefix}.commands")
            events = f"{system.prefix}.events"

            async def publish(sim: SimServer) -> None:
                if sim.silent:
                    return
                message = aio_pika.Message(
                    sim.heartbeat(),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await channel.default_exchange.publish(message, events)

            for sim in sims:
                queue = await channel.declare_queue(
                    f"{system.prefix}.commands.{sim.id}.sim", exclusive=True, auto_delete=True
                )
                await queue.bind(commands, routing_key=sim.id)

                async def on_message(
                    message: aio_pika.abc.AbstractIncomingMessage, sim: SimServer = sim
                ) -> None:
                    await message.ack()
                    if sim.on_command(message.body):
                        await publish(sim)

                await queue.consume(on_message)

            async def beat_loop() -> None:
                gap = interval / len(sims)  # spread over the interval, as real servers are
                while True:
                    for sim in sims:
                        started = time.monotonic()
                        await publish(sim)
                        await asyncio.sleep(max(0.0, gap - (time.monotonic() - started)))

            beats = asyncio.create_task(beat_loop())
            try:
                if legacy:
                    await asyncio.sleep(3 * interval)
                else:
                    out["first_convergence_s"] = await _converged(sims, time.monotonic(), 600)
                out["settled_s"] = await _settled(channel, events, len(sims), 180)
                out.update(await _steady(system, sims, window))
                if not legacy:
                    out.update(await _restart(cluster, system, sims, interval))
                out.update(await _silent(system, sims[-1], per_server))
            finally:
                beats.cancel()
        finally:
            await connection.close()
    return out


async def _converged(sims: list[SimServer], since: float, within: float) -> float | None:
    """Seconds from ``since`` until every server's complete listing made after it
    was acknowledged."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(sim.full_acked_at > since for sim in sims):
            return round(max(sim.full_acked_at for sim in sims) - since, 2)
        await asyncio.sleep(0.05)
    return None


async def _settled(
    channel: aio_pika.abc.AbstractChannel, queue: str, servers: int, within: float
) -> float | None:
    """Seconds until the manager keeps up: the events queue held fewer messages
    than there are servers at three checks in a row (a backlog makes the
    manager's copies stale, and the steady state would measure the catching up)."""
    started = time.monotonic()
    quiet = 0
    while time.monotonic() - started < within:
        depth = (await channel.declare_queue(queue, passive=True)).declaration_result
        quiet = quiet + 1 if int(depth.message_count or 0) < servers else 0
        if quiet >= 3:
            return round(time.monotonic() - started, 1)
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


async def _steady(system: OrchestratR, sims: list[SimServer], window: float) -> dict[str, Any]:
    assert system.manager is not None
    pid = system.manager.pid
    await asyncio.sleep(1.5)  # statistics are flushed about once a second
    w0, c0, t0 = await _writes(system), cpu_seconds(pid), time.monotonic()
    sent0 = sum(s.sent for s in sims)
    bytes0 = sum(s.sent_bytes for s in sims)
    await asyncio.sleep(window)
    c1, t1 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(1.5)
    w1 = await _writes(system)
    wall = t1 - t0
    per_table = {k: round((w1.get(k, 0) - w0.get(k, 0)) / wall, 1) for k in w1}
    return {
        "manager_cpu_pct": round(100 * (c1 - c0) / wall, 1),
        "manager_rss_bytes": rss_bytes(pid),
        "db_row_writes_per_s": per_table,
        "heartbeats_per_s": round((sum(s.sent for s in sims) - sent0) / wall, 1),
        "heartbeat_bytes_per_s": round((sum(s.sent_bytes for s in sims) - bytes0) / wall),
        "window_s": round(wall, 1),
    }


async def _restart(
    cluster: Cluster, system: OrchestratR, sims: list[SimServer], interval: float
) -> dict[str, Any]:
    """``kill -9`` the manager, start a new one: seconds until it acknowledged
    every server's complete listing (it lacks their sets, so it asks each)."""
    assert system.manager is not None
    cluster.procs.kill9(system.manager)
    await asyncio.sleep(0.5)
    started = time.monotonic()
    system.manager = system.procs.python(f"{system.prefix}-manager2", system.manager_argv())
    converged = await _converged(sims, started, 600)
    return {"restart_convergence_s": converged, "restart_note": "from spawning the new manager"}


async def _silent(system: OrchestratR, sim: SimServer, per_server: int) -> dict[str, Any]:
    """One server stops its heartbeats: seconds until the database shows it dead
    and every one of its jobs pending."""
    sim.silent = True
    at = time.monotonic()
    pool = system._storage.connector._pool
    deadline = at + 120
    while time.monotonic() < deadline:
        async with pool.acquire() as conn:
            status = await conn.fetchval(
                f'SELECT status FROM "{system.schema}".servers WHERE id = $1', sim.id
            )
            left = await conn.fetchval(
                f'SELECT count(*) FROM "{system.schema}".jobs WHERE server_id = $1', sim.id
            )
        if status == "dead" and left == 0:
            return {"dead_server_detected_s": round(time.monotonic() - at, 2)}
        await asyncio.sleep(0.2)
    return {"dead_server_detected_s": None, "jobs_of_silent_server": per_server}


async def main_async(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="orx-sim-"))
    runs = []
    for size in sizes:
        print(f"[{time.strftime('%H:%M:%S')}] {size} jobs", flush=True)
        try:
            servers = args.servers or max(1, size // args.per_server)
            result = await simulate(
                work,
                jobs=size,
                servers=servers,
                interval=args.interval,
                window=args.window,
                legacy=args.legacy,
            )
        except Exception as exc:  # recorded, not raised: the next size may still fit
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
    name = "sim-legacy.json" if args.legacy else "sim.json"
    (RESULTS / name).write_text(json.dumps(doc, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--sizes", default="100000", help="jobs per run, comma-separated")
    parser.add_argument("--servers", type=int, default=0, help="0: jobs / --per-server")
    parser.add_argument("--per-server", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=2.0, help="server heartbeat (s)")
    parser.add_argument("--window", type=float, default=20.0, help="steady-state window (s)")
    parser.add_argument(
        "--legacy", action="store_true", help="servers of the previous version (complete listings)"
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
