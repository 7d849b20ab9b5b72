"""The bare broker's failover floor, for comparison with OrchestratR's figure.

A plain aio-pika consumer (a subprocess) holds 1,000 unacknowledged messages; it is
killed with SIGKILL; we time how long a waiting consumer takes to have all 1,000.
That is the least any transport on this broker can do. Several runs; median and
worst go to ``benchmarks/results/rabbitmq_floor.json``.

    .venv/bin/python benchmarks/rabbitmq_failover.py [--runs 7] [--messages 1000]
        [--queue-type quorum|classic] [--url amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path

import aio_pika

HOLDER = r"""
import asyncio, sys, aio_pika
async def main(url, names, count):
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=count)
    held = []
    ready = asyncio.Event()
    async def hold(message):
        held.append(message)  # never acked
        if len(held) == count:
            ready.set()
    for name in names.split(","):
        q = await channel.get_queue(name, ensure=False)
        await q.consume(hold)
    await ready.wait()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""
"""A consumer process holding ``count`` messages of the queues named (comma-separated)."""


async def hand_over(
    connection: aio_pika.abc.AbstractConnection, url: str, names: list[str], messages: int
) -> float:
    """Start a holder of ``messages`` messages from ``names``, let a waiting consumer
    subscribe to every one of them, ``kill -9`` the holder: seconds until the waiting
    consumer has them all."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, url, ",".join(names), str(messages),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdout is not None
    line = await asyncio.wait_for(holder.stdout.readline(), 60)
    assert line.strip() == b"ready", line

    waiting = await connection.channel()
    await waiting.set_qos(prefetch_count=messages)
    received = 0
    done = asyncio.Event()

    async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal received
        received += 1
        if received == messages:
            done.set()

    for name in names:
        await (await waiting.get_queue(name, ensure=False)).consume(take)
    await asyncio.sleep(0.5)  # nothing may arrive while the holder lives
    assert received == 0, "the waiting consumer got messages the holder held"
    started = time.perf_counter()
    os.kill(holder.pid, signal.SIGKILL)
    await asyncio.wait_for(done.wait(), 60)
    elapsed = time.perf_counter() - started
    await holder.wait()
    await waiting.close()
    return elapsed


async def one_run(url: str, queue_type: str, messages: int) -> float:
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    name = f"bench-floor-{uuid.uuid4().hex[:8]}"
    queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": queue_type})
    try:
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(
                        b'{"job": %d}' % n, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                    ),
                    name,
                )
                for n in range(messages)
            )
        )
        return await hand_over(connection, url, [name], messages)
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await connection.close()


async def measure(args: argparse.Namespace) -> tuple[str, list[float]]:
    """Run the measurement ``args.runs`` times; return the broker version and times."""
    probe = await aio_pika.connect(args.url)
    raw_version = probe.transport.connection.server_properties.get("version", b"?")  # type: ignore[union-attr]
    version = raw_version.decode() if isinstance(raw_version, bytes) else str(raw_version)
    await probe.close()

    runs: list[float] = []
    for n in range(args.runs):
        seconds = await one_run(args.url, args.queue_type, args.messages)
        runs.append(seconds)
        print(f"run {n + 1}: {seconds * 1000:.1f} ms")
    return version, runs


def main() -> None:
    """Measure, print, and merge the result into the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--queue-type", default="quorum", choices=["quorum", "classic"])
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "rabbitmq_floor.json")
    )
    args = parser.parse_args()

    version, runs = asyncio.run(measure(args))
    result = {
        "what": (
            f"kill -9 of a plain aio-pika consumer holding {args.messages} unacked messages "
            "until a waiting consumer has them all"
        ),
        "broker": f"RabbitMQ {version}",
        "queue_type": args.queue_type,
        "messages": args.messages,
        "runs_s": [round(r, 4) for r in runs],
        "median_s": round(statistics.median(runs), 4),
        "worst_s": round(max(runs), 4),
        "python": platform.python_version(),
        "aio_pika": aio_pika.__version__,
        "host": platform.node(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else {}
    existing[f"floor_{args.queue_type}"] = result
    out.write_text(json.dumps(existing, indent=2) + "\n")
    print(
        f"floor ({args.queue_type}, {args.messages} messages): median "
        f"{result['median_s'] * 1000:.0f} ms, worst {result['worst_s'] * 1000:.0f} ms -> {out}"
    )


if __name__ == "__main__":
    main()
