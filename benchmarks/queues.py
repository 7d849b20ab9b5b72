"""One jobs queue or N: what the broker itself does with the jobs traffic of one
pool spread over N quorum queues (each its own Raft group), against one.

Per layout, alternating within each run:

* **creates/s**: ``--creates`` persistent messages published with publisher confirms
  (``--in-flight`` unconfirmed at most, as the client's batched creates pipeline
  theirs), round-robin over the queues;
* **failover floor**: a consumer process holding ``--messages`` unacknowledged
  messages spread over the queues is killed with SIGKILL; seconds until a waiting
  consumer (on every queue) has them all.

    .venv/bin/python -m benchmarks.queues --layouts 1,4 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from typing import Any

import aio_pika

from benchmarks.common import AMQP, RESULTS, machine
from benchmarks.rabbitmq_failover import hand_over


async def _declare(channel: aio_pika.abc.AbstractChannel, n: int) -> list[str]:
    prefix = f"bench-shard-{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}.jobs.{k}" for k in range(n)]
    for name in names:
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    return names


async def _publish(
    channel: aio_pika.abc.AbstractChannel, names: list[str], count: int, in_flight: int
) -> float:
    gate = asyncio.Semaphore(in_flight)

    async def one(n: int) -> None:
        async with gate:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    b'{"job": %d}' % n, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                ),
                names[n % len(names)],
            )

    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(count)))
    return count / (time.perf_counter() - started)


async def one_run(n: int, creates: int, messages: int, in_flight: int) -> dict[str, float]:
    connection = await aio_pika.connect(AMQP)
    channel = await connection.channel(publisher_confirms=True)
    names = await _declare(channel, n)
    try:
        rate = await _publish(channel, names, creates, in_flight)
        for name in names:
            await (await channel.get_queue(name, ensure=False)).purge()
        await _publish(channel, names, messages, in_flight)
        failover = await hand_over(connection, AMQP, names, messages)
        return {"creates_per_s": rate, "failover_s": failover}
    finally:
        cleanup = await connection.channel()
        for name in names:
            await cleanup.queue_delete(name)
        await connection.close()


async def main_async(args: argparse.Namespace) -> None:
    layouts = [int(x) for x in args.layouts.split(",")]
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in layouts}
    for r in range(args.runs):
        order = layouts if r % 2 == 0 else list(reversed(layouts))  # alternate who goes first
        for n in order:
            result = await one_run(n, args.creates, args.messages, args.in_flight)
            runs[n].append(result)
            print(
                f"run {r + 1}, {n} queue(s): {result['creates_per_s']:.0f} creates/s, "
                f"failover {result['failover_s'] * 1000:.0f} ms",
                flush=True,
            )
    summary: dict[str, Any] = {}
    for n, results in runs.items():
        summary[str(n)] = {
            "creates_per_s_median": round(statistics.median(x["creates_per_s"] for x in results)),
            "failover_s_median": round(statistics.median(x["failover_s"] for x in results), 4),
            "runs": results,
        }
    doc = {
        "what": __doc__.splitlines()[0] if __doc__ else "",
        "command": " ".join(["python -m benchmarks.queues", *sys.argv[1:]]),
        "machine": machine(),
        "creates": args.creates,
        "messages": args.messages,
        "in_flight": args.in_flight,
        "layouts": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "queues.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: {kk: v[kk] for kk in v if kk != "runs"} for k, v in summary.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--layouts", default="1,4", help="numbers of queues, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--creates", type=int, default=20000)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=1000)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
