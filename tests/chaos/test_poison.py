"""Issue 11, section 1, with real processes: one bad event must not halt the
manager. While 20 jobs run on two ``orchestratr server`` processes (RabbitMQ,
PostgreSQL), a job fails with an error text holding a NUL and malformed events
land on the events queue; then a job is created. Nothing else may be disturbed:
no server declared dead, the 20 keep running (one copy each), the new job runs,
the manager's view stays right."""

from __future__ import annotations

import asyncio
import json
import time

import aio_pika
import pytest

from orchestratr_core.job import JobStatus, ServerStatus
from tests.chaos.harness import ChaosCluster

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgresql]

JOB = "tests.chaos.poison_jobs:nul_error_or_ledger_job"
BROKER = "amqp://guest:guest@127.0.0.1:5672/"


def _malformed_events(server_id: str, job_id: str) -> list[bytes]:
    """The hostile events of the issue: each once halted the manager or its decoder."""
    return [
        b'{"v":1,"type":"started","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"v":1,"type":"heartbeat","server_id":"%s","name":"x","max_workers":3000000000,'
        b'"started_at":1,"sent_at":1,"jobs":[]}' % server_id.encode(),
        b'{"v":1,"type":"started","server_id":"%s","job_id":"%s","fence":9223372036854775808,'
        b'"at":1}' % (server_id.encode(), job_id.encode()),
        b"\xff not even JSON",
    ]


async def _publish_raw(namespace: str, bodies: list[bytes]) -> None:
    connection = await aio_pika.connect(BROKER)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for body in bodies:
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                f"{namespace}.events",
            )
    finally:
        await connection.close()


async def _dead_letters(namespace: str) -> list[bytes]:
    connection = await aio_pika.connect(BROKER)
    try:
        channel = await connection.channel()
        dead = await channel.declare_queue(f"{namespace}.dead", passive=True)
        bodies = []
        while (message := await dead.get(timeout=5, fail=False)) is not None:
            bodies.append(message.body)
        return bodies
    finally:
        await connection.close()


async def _settled(chaos: ChaosCluster, ids: list[str]) -> float:
    """Wait until the initial rebalancing is over (the running copies of ``ids``
    unchanged for two rebalancing rounds); the time from which nothing may move."""
    quiet_for = 2 * chaos.timings.rebalance_interval + 0.5
    deadline = time.monotonic() + 30
    last: set[tuple[str, int]] = set()
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        now = {(c.job, c.pid) for c in chaos.live_copies() if c.job in ids}
        if now != last:
            last, stable_since = now, time.monotonic()
        elif len(now) == len(ids) and time.monotonic() - stable_since >= quiet_for:
            return time.time()
        await asyncio.sleep(0.2)
    raise AssertionError(f"the 20 jobs never settled\n{chaos.tail_logs()}")


async def test_a_nul_error_and_malformed_events_disturb_nothing_else(chaos: ChaosCluster) -> None:
    t0 = time.monotonic()
    for name in ("s1", "s2"):
        await chaos.add_server(name, 15, job=JOB)
    ids = await chaos.create(20)
    await chaos.wait_all_running(ids, within=30)
    since = await _settled(chaos, ids)
    servers = {s.name: s.id for s in await chaos.servers()}
    assert sorted(servers) == ["s1", "s2"]

    # The poison: a job whose every run fails with a NUL in its error, and bad events.
    (poison,) = await chaos.create(1, prefix="poison")
    bad = _malformed_events(servers["s1"], ids[0])
    await _publish_raw(chaos.namespace, bad)
    poisoned = time.monotonic()

    async def poison_failed_repeatedly() -> str | None:
        job = next(j for j in await chaos.jobs() if j.id == poison)
        return job.last_error if job.restarts >= 2 else None

    error = None
    while error is None:
        assert time.monotonic() - t0 < 50, (
            f"the poison job's failures were never stored\n{chaos.tail_logs()}"
        )
        error = await poison_failed_repeatedly()
        await asyncio.sleep(0.2)
    assert error.startswith("ValueError: bad \\x00 byte"), error
    print(f"poison: 2 failures with a NUL stored {time.monotonic() - poisoned:.2f} s after it")

    # Longer than the manager's server timeout: a stalled event queue would have
    # let every heartbeat wait behind the poison and both servers be declared dead.
    await asyncio.sleep(chaos.timings.server_timeout + 1)
    # Through the CLI, as an operator would: the manager's outbox relay sends it.
    late = json.loads(await chaos.cli("jobs", "create", "late-job", "after", "--json"))["id"]
    took = await chaos.wait_all_running([*ids, late], within=10)
    print(f"poison: the job created after it running {took:.2f} s after its create returned")
    await chaos.wait_view_converges([*ids, late], within=5)

    statuses = {s.name: s.status for s in await chaos.servers()}
    assert statuses == {"s1": ServerStatus.ALIVE, "s2": ServerStatus.ALIVE}
    late_job = next(j for j in await chaos.jobs() if j.id == late)
    assert late_job.status is JobStatus.PROCESSING
    # The 20 were never stopped or moved after the poison: their copies are the same.
    moved = [c for c in chaos.copies() if c.job in ids and max(c.start, c.stop or 0) > since]
    assert moved == [], moved
    chaos.check().assert_ok()
    dead = await _dead_letters(chaos.namespace)
    assert all(body in dead for body in bad), [body[:60] for body in dead]
    assert time.monotonic() - t0 < 60
