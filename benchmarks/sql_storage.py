"""Benchmark of the PostgreSQL storage: monitor paging over 1,000,000 jobs and
heartbeat ingestion for 100,000 running jobs, through the Storage API; with
``--allocation``, job creation through the client instead.

    .venv/bin/python benchmarks/sql_storage.py \
        --url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python benchmarks/sql_storage.py --allocation --alloc-jobs 3000 --runs 3

``--allocation`` times ``OrchestratorClient.create_job`` one at a time and 32 in
flight, and ``create_jobs`` in batches of 100 and 1,000 (when the code has it),
each without a transport (the storage alone: the outbox rows are left for a
manager) and with the in-memory transport (publish, then the outbox rows are
deleted), and prints jobs/s medians; ``--out`` writes them as JSON. It runs
against whatever ``orchestratr_*`` packages are importable, so the same script
measures an older tree through ``PYTHONPATH``.

Creates a schema of its own (``orx_bench_<random>``), bulk-loads the jobs with
COPY, reports medians over ``--runs`` runs, writes
``benchmarks/results/sql_storage.json`` and drops the schema at the end.
Goals: a page in under 50 ms at any depth; at least 20,000 job
heartbeats per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestratr_core.job import JobQuery, JobStatus, new_id
from orchestratr_core.protocol import RunningJob, ServerHeartbeat
from orchestratr_sql import SqlStorage, storage_from_url

RESULTS = Path(__file__).parent / "results" / "sql_storage.json"
COLUMNS = (
    "id",
    "name",
    "argument",
    "status",
    "server_id",
    "fence",
    "generation",
    "created_at",
    "updated_at",
    "restarts",
)


async def _drop_schema_and_close(storage: Any, schema: str) -> None:
    """Remove the benchmark's schema, then release the storage."""
    try:
        async with storage.connector.transaction() as conn:
            await conn.run_script_statement(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await storage.close()


async def _timed(runs: int, call: Callable[[], Awaitable[Any]]) -> dict[str, float]:
    await call()  # warm-up: prepared statement, caches
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000)
    return {
        "median_ms": round(statistics.median(samples), 2),
        "min_ms": round(min(samples), 2),
        "max_ms": round(max(samples), 2),
    }


async def _load(
    storage: SqlStorage, schema: str, jobs: int, running: int, per_server: int
) -> list[str]:
    """COPY ``jobs`` rows; the first ``running`` are processing on servers of
    ``per_server`` jobs each. Returns the ids in id order."""
    now = datetime.now(UTC)
    ids = sorted(new_id() for _ in range(jobs))
    pool = storage.connector._pool
    chunk = 100_000
    async with pool.acquire() as conn:
        for start in range(0, jobs, chunk):
            records = []
            for index in range(start, min(start + chunk, jobs)):
                on_server = index < running
                records.append(
                    (
                        ids[index],
                        f"job-{index:07d}",
                        "{}",
                        JobStatus.PROCESSING.value if on_server else JobStatus.PENDING.value,
                        f"s{index // per_server:03d}" if on_server else None,
                        1 << 32 if on_server else 0,
                        1,
                        now,
                        now,
                        0,
                    )
                )
            await conn.copy_records_to_table(
                "jobs", records=records, columns=COLUMNS, schema_name=schema
            )
        await conn.execute(f'ANALYZE "{schema}".jobs')
    return ids


def _heartbeats(
    ids: list[str], servers: int, per_server: int, round_: int
) -> list[ServerHeartbeat]:
    now = time.time()
    beats = []
    for server in range(servers):
        jobs = tuple(
            RunningJob(job_id=job_id, fence=1 << 32, last_heartbeat=now, restarts=round_ % 2)
            for job_id in ids[server * per_server : (server + 1) * per_server]
        )
        beats.append(
            ServerHeartbeat(
                server_id=f"s{server:03d}",
                name=f"server-{server:03d}",
                max_workers=per_server,
                started_at=now - 60,
                sent_at=now,
                host="bench",
                pid=server,
                jobs=jobs,
            )
        )
    return beats


async def _ingest(storage: SqlStorage, beats: list[ServerHeartbeat], concurrency: int) -> float:
    """Seconds to apply every heartbeat, ``concurrency`` at a time."""
    queue = list(beats)
    rejected: list[int] = []

    async def worker() -> None:
        while queue:
            beat = queue.pop()
            rejected.append(len(await storage.apply_heartbeat(beat, datetime.now(UTC))))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    if any(rejected):
        raise RuntimeError(f"{sum(rejected)} reports were rejected: the load is wrong")
    return elapsed


async def _allocation(args: argparse.Namespace) -> int:
    """Jobs/s of job creation through the client, medians of ``--runs`` runs."""
    import orchestratr_core
    from orchestratr_core.client import OrchestratorClient
    from orchestratr_memory.broker import MemoryBroker
    from orchestratr_memory.transport import MemoryTransport

    schema = f"orx_bench_{uuid.uuid4().hex[:8]}"
    separator = "&" if "?" in args.url else "?"
    storage = storage_from_url(f"{args.url}{separator}schema={schema}", pool_max=10)
    jobs = args.alloc_jobs
    batched = hasattr(OrchestratorClient, "create_jobs")
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "code": str(Path(orchestratr_core.__file__).parent),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "jobs_per_run": jobs,
        "runs": args.runs,
        "rates": {},
    }

    async def wipe() -> None:
        async with storage.connector.transaction() as conn:
            await conn.run_script_statement("TRUNCATE outbox, jobs")

    async def one_by_one(client: Any, prefix: str, inflight: int) -> None:
        names = iter(range(jobs))

        async def worker() -> None:
            for i in names:
                await client.create_job(f"{prefix}-{i:06d}", "{}")

        await asyncio.gather(*(worker() for _ in range(inflight)))

    async def in_batches(client: Any, prefix: str, size: int) -> None:
        for start in range(0, jobs, size):
            names = [f"{prefix}-{i:06d}" for i in range(start, min(start + size, jobs))]
            await client.create_jobs([(name, "{}") for name in names])

    cases: list[tuple[str, Callable[[Any, str], Awaitable[None]]]] = [
        ("create_job, one at a time", lambda c, p: one_by_one(c, p, 1)),
        ("create_job, 32 in flight", lambda c, p: one_by_one(c, p, 32)),
    ]
    if batched:
        cases += [
            ("create_jobs, batches of 100", lambda c, p: in_batches(c, p, 100)),
            ("create_jobs, batches of 1000", lambda c, p: in_batches(c, p, 1000)),
        ]
    await storage.open()
    try:
        async with storage.connector.transaction() as conn:
            version = await conn.fetch(conn.adhoc("version", "SHOW server_version"), {})
        results["database"] = f"PostgreSQL {version[0]['server_version']}"
        for with_transport in (False, True):
            for label, run in cases:
                name = f"{label}, {'memory transport' if with_transport else 'no transport'}"
                rates = []
                for attempt in range(args.runs + 1):  # the first run warms up
                    await wipe()
                    transport = None
                    broker = f"bench-{uuid.uuid4().hex[:8]}"
                    if with_transport:
                        transport = MemoryTransport(f"memory://{broker}")
                        await transport.connect()
                    client = OrchestratorClient(storage, transport, holder="bench")
                    start = time.perf_counter()
                    await run(client, f"r{attempt}")
                    if hasattr(client, "close"):
                        await client.close()  # the last outbox deletes count too
                    elapsed = time.perf_counter() - start
                    if transport is not None:
                        await transport.close()
                        MemoryBroker.reset(broker)
                    if attempt:
                        rates.append(jobs / elapsed)
                results["rates"][name] = {
                    "median_jobs_per_s": round(statistics.median(rates)),
                    "runs_jobs_per_s": [round(rate) for rate in rates],
                }
                print(f"{name:<60} {round(statistics.median(rates)):>8,} jobs/s", flush=True)
    finally:
        await _drop_schema_and_close(storage, schema)
    if args.out:
        _write_json(args.out, results)
        print(f"written to {args.out}")
    return 0


def _write_json(path: str, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--servers", type=int, default=100)
    parser.add_argument("--per-server", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--heartbeat-rounds", type=int, default=5)
    parser.add_argument(
        "--allocation", action="store_true", help="measure job creation through the client only"
    )
    parser.add_argument("--alloc-jobs", type=int, default=3000, help="jobs per allocation run")
    parser.add_argument("--out", help="--allocation: write the figures to this JSON file")
    args = parser.parse_args()
    if args.allocation:
        return await _allocation(args)

    schema = f"orx_bench_{uuid.uuid4().hex[:8]}"
    separator = "&" if "?" in args.url else "?"
    storage = storage_from_url(f"{args.url}{separator}schema={schema}", pool_max=8)
    running = args.servers * args.per_server
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}",
        "jobs": args.jobs,
        "running_jobs": running,
        "runs": args.runs,
    }
    await storage.open()
    try:
        server_version = await storage.connector._pool.fetchval("SHOW server_version")
        results["database"] = f"PostgreSQL {server_version}"
        start = time.perf_counter()
        ids = await _load(storage, schema, args.jobs, running, args.per_server)
        results["load_seconds"] = round(time.perf_counter() - start, 1)
        print(f"loaded {args.jobs:,} jobs in {results['load_seconds']} s (COPY)")

        deep = int(args.jobs * 0.9)
        pages: dict[str, dict[str, float]] = {}
        pages["first page (100)"] = await _timed(
            args.runs, lambda: storage.list_jobs(JobQuery(limit=100))
        )
        pages[f"keyset page at {deep:,}"] = await _timed(
            args.runs, lambda: storage.list_jobs(JobQuery(after=ids[deep - 1], limit=100))
        )
        pages[f"offset page at {deep:,}"] = await _timed(
            args.runs, lambda: storage.list_jobs(JobQuery(offset=deep, limit=100))
        )
        pages["keyset, status=pending, deep"] = await _timed(
            args.runs,
            lambda: storage.list_jobs(
                JobQuery(statuses=frozenset({JobStatus.PENDING}), after=ids[deep - 1], limit=100)
            ),
        )
        pages["server s042, first page"] = await _timed(
            args.runs, lambda: storage.list_jobs(JobQuery(server_id="s042", limit=100))
        )
        pages["name prefix job-09, keyset deep"] = await _timed(
            args.runs,
            lambda: storage.list_jobs(
                JobQuery(name_prefix="job-09", after=ids[deep - 1], limit=100)
            ),
        )
        pages["first page with total"] = await _timed(
            args.runs, lambda: storage.list_jobs(JobQuery(limit=100), with_total=True)
        )
        results["pages"] = pages

        ingestion: dict[str, Any] = {}
        for concurrency in (1, 4):
            rates = []
            for round_ in range(args.heartbeat_rounds):
                beats = _heartbeats(ids, args.servers, args.per_server, round_)
                elapsed = await _ingest(storage, beats, concurrency)
                rates.append(running / elapsed)
            ingestion[f"concurrency {concurrency}"] = {
                "median_jobs_per_s": round(statistics.median(rates)),
                "min_jobs_per_s": round(min(rates)),
                "median_seconds_per_round": round(running / statistics.median(rates), 3),
            }
        results["heartbeats"] = ingestion
    finally:
        await _drop_schema_and_close(storage, schema)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['database']}, {args.jobs:,} jobs, medians of {args.runs} runs")
    print(f"{'page query (Storage.list_jobs)':<40} {'median ms':>10} {'max ms':>10}")
    for name, figures in results["pages"].items():
        print(f"{name:<40} {figures['median_ms']:>10} {figures['max_ms']:>10}")
    print(f"\n{'heartbeat ingestion, ' + format(running, ',') + ' jobs':<40} {'jobs/s':>10}")
    for name, figures in results["heartbeats"].items():
        print(f"{name:<40} {figures['median_jobs_per_s']:>10,}")
    print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
