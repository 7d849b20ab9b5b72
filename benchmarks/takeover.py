"""CPU a server spends per job it takes over: one ``OrchestratedServer`` (the real
RabbitMQ transport, in this process) waits with room while a plain consumer (the
"victim", another connection) holds N job messages unacknowledged; the victim's
connection closes, the broker hands the N messages (redelivered) to the server,
and the figure is this process's CPU time (``time.process_time()``) from the
close until the N-th job function ran its first line, divided by N. CPU time,
not wall time, so that a loaded machine disturbs it less; the wall time is
printed too.

    .venv/bin/python -m benchmarks.takeover --jobs 1000 --runs 5
    .venv/bin/python -m benchmarks.takeover --jobs 333 --held 1000 --runs 5   # a survivor's share
    .venv/bin/python -m benchmarks.takeover --jobs 1000 --runs 1 --profile /tmp/takeover.prof

Instructions, which a loaded machine does not change (valgrind's callgrind, with
instrumentation only between the close and the last job's first line):

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.%p \
        .venv/bin/python -m benchmarks.takeover --jobs 1000 --runs 1 --callgrind
    callgrind_annotate /tmp/cg.<pid> | head    # "PROGRAM TOTALS": Ir / 1000 per job
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import statistics
import subprocess
import time
import uuid
from typing import Any

from benchmarks.common import AMQP, delete_broker_objects


def _callgrind(on: bool) -> None:
    """Turn valgrind's instrumentation of this process on or off (``--callgrind``)."""
    subprocess.run(
        ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
        check=True,
        capture_output=True,
    )


async def one_run(
    jobs: int, held_before: int, profile: str | None, callgrind: bool = False
) -> dict[str, float]:
    import aio_pika

    from orchestratr_core import OrchestratedServer
    from orchestratr_core.job import new_id
    from orchestratr_core.placement import DEFAULT_POOL
    from orchestratr_core.plugin import get_plugin_manager
    from orchestratr_core.protocol import JobMessage

    prefix = f"bench-takeover-{uuid.uuid4().hex[:8]}"
    url = f"{AMQP}?namespace={prefix}"
    started = 0
    own_started, all_started = asyncio.Event(), asyncio.Event()

    async def job(arg: Any, token: Any, heartbeat: Any) -> None:
        nonlocal started
        started += 1
        if started == held_before:
            own_started.set()
        if started == jobs + held_before:
            all_started.set()
        await token.wait()

    publisher = get_plugin_manager().make_transport(url)
    server: OrchestratedServer | None = None
    victim = await aio_pika.connect(AMQP)
    try:
        await publisher.connect()

        async def publish(count: int) -> None:
            for i in range(count):
                await publisher.publish_job(
                    JobMessage(
                        job_id=new_id(),
                        name=f"j{i}",
                        argument="",
                        generation=1,
                        created_at=time.time(),
                    )
                )

        await publish(jobs)
        queue_name = publisher.topology.pool_queue(DEFAULT_POOL)  # type: ignore[attr-defined]
        channel = await victim.channel()
        await channel.set_qos(prefetch_count=jobs)
        queue = await channel.get_queue(queue_name, ensure=False)
        held = 0
        everything = asyncio.Event()

        async def hold(_: Any) -> None:
            nonlocal held
            held += 1
            if held == jobs:
                everything.set()

        await queue.consume(hold, no_ack=False)
        await asyncio.wait_for(everything.wait(), 60)
        await publish(held_before)  # the server's own jobs (the victim has no room left)
        server = OrchestratedServer(
            job, transport=url, max_workers=jobs + held_before, name="takeover"
        )
        await server.start()
        if held_before:
            await asyncio.wait_for(own_started.wait(), 60)
        await asyncio.sleep(3.0)  # its own jobs settle; its consumers have credit again
        profiler = cProfile.Profile() if profile else None
        if callgrind:
            await asyncio.to_thread(_callgrind, True)
        cpu0, wall0 = time.process_time(), time.monotonic()
        if profiler is not None:
            profiler.enable()
        await victim.close()
        await asyncio.wait_for(all_started.wait(), 600 if callgrind else 120)
        cpu1, wall1 = time.process_time(), time.monotonic()
        if callgrind:
            _callgrind(False)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile or "")
        return {"cpu_us_per_job": (cpu1 - cpu0) / jobs * 1e6, "wall_s": wall1 - wall0}
    finally:
        if server is not None:
            await server.stop(handover=False)
        await victim.close()
        await publisher.close()
        await delete_broker_objects(prefix)


async def main_async(args: argparse.Namespace) -> None:
    results = []
    for r in range(args.runs):
        res = await one_run(args.jobs, args.held, args.profile if r == 0 else None, args.callgrind)
        print(
            f"run {r + 1}: {res['cpu_us_per_job']:.0f} us CPU per job, wall {res['wall_s']:.3f} s"
        )
        results.append(res)
    summary = {
        "jobs": args.jobs,
        "runs": len(results),
        "held": args.held,
        "cpu_us_per_job_median": round(statistics.median(r["cpu_us_per_job"] for r in results)),
        "cpu_us_per_job_min": round(min(r["cpu_us_per_job"] for r in results)),
        "wall_s_median": round(statistics.median(r["wall_s"] for r in results), 4),
    }
    print(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--held", type=int, default=0, help="jobs the server already runs (the benchmark's 1,000)"
    )
    parser.add_argument("--profile", help="write a cProfile of the first run's takeover here")
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="run under valgrind --tool=callgrind --instr-atstart=no: instrument the takeover only",
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
