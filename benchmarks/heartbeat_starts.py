"""Benchmark of what a manager does for each heartbeat while a fleet fills: apply
a heartbeat of what changed that lists the jobs its server just started, after
reading those jobs as they were (the manager's ``_on_heartbeat``), one heartbeat
after another, as the manager applies its events queue.

    .venv/bin/python benchmarks/heartbeat_starts.py \
        --url postgresql://postgres@127.0.0.1:5432/test --out starts-new.json
    PYTHONPATH=/tmp/old/orchestratr_core/src:/tmp/old/orchestratr_sql/src \
        .venv/bin/python benchmarks/heartbeat_starts.py --out starts-old.json

Through ``Storage.read_and_apply_heartbeat`` where the code has it, else as the
manager did before it: ``get_jobs`` then ``apply_heartbeat``. It runs against
whatever ``orchestratr_*`` packages are importable, so the same script measures
an older tree through ``PYTHONPATH``; run both in one session and compare the
medians as a ratio (the machine is shared).

Each round creates ``--servers`` x ``--per-heartbeat`` pending jobs, then each
server sends one heartbeat starting its share; ``--rounds`` rounds per run,
``--runs`` runs, the median of the per-run heartbeats/s reported. A schema of its
own (``orx_bench_<random>``), dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestratr_core.job import NewJob, new_id
from orchestratr_core.protocol import RunningJob, ServerHeartbeat
from orchestratr_sql import SqlStorage, storage_from_url


def _heartbeat(server: int, jobs: list[str], seq: int) -> ServerHeartbeat:
    now = time.time()
    return ServerHeartbeat(
        server_id=f"s{server:04d}",
        name=f"sim-{server:04d}",
        max_workers=1000,
        started_at=now - 60,
        sent_at=now,
        host="bench",
        pid=1,
        jobs=tuple(RunningJob(job_id, 0, None, 0) for job_id in jobs),
        seq=seq,
        base=seq - 1,
        started=tuple(jobs),
        digest=0,
        running=len(jobs),
    )


async def _apply(storage: SqlStorage, hb: ServerHeartbeat) -> None:
    """One heartbeat as the manager applies it."""
    now = datetime.now(UTC)
    combined = getattr(storage, "read_and_apply_heartbeat", None)
    if combined is not None:
        await combined(hb, now, hb.started)
    else:  # the code before read_and_apply_heartbeat
        await storage.get_jobs(hb.started)
        await storage.apply_heartbeat(hb, now)


async def _run(storage: SqlStorage, args: argparse.Namespace) -> float:
    """Heartbeats/s of one run."""
    elapsed = 0.0
    applied = 0
    for round_ in range(args.rounds):
        now = datetime.now(UTC)
        new = [
            NewJob(id=new_id(), name=f"j-{new_id()}", argument="{}", created_at=now)
            for _ in range(args.servers * args.per_heartbeat)
        ]
        jobs = [job.id for job in await storage.create_jobs(new, "bench", now)]
        async with storage.connector.transaction() as conn:  # plans as on a table in use
            await conn.run_script_statement("ANALYZE jobs")
        beats = [
            _heartbeat(
                server,
                jobs[server * args.per_heartbeat : (server + 1) * args.per_heartbeat],
                round_ + 2,
            )
            for server in range(args.servers)
        ]
        start = time.perf_counter()
        for hb in beats:
            await _apply(storage, hb)
        elapsed += time.perf_counter() - start
        applied += len(beats)
    return applied / elapsed


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    schema = f"orx_bench_{uuid.uuid4().hex[:8]}"
    separator = "&" if "?" in args.url else "?"
    storage = storage_from_url(f"{args.url}{separator}schema={schema}", pool_max=4)
    await storage.open()
    try:
        warm = dataclasses.replace(_heartbeat(0, [], 1), started=())
        await _apply(storage, warm)
        rates = [await _run(storage, args) for _ in range(args.runs)]
    finally:
        try:
            async with storage.connector.transaction() as conn:
                await conn.run_script_statement(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await storage.close()
    return {
        "code": "read_and_apply_heartbeat"
        if hasattr(SqlStorage, "read_and_apply_heartbeat")
        else "get_jobs + apply_heartbeat",
        "servers": args.servers,
        "per_heartbeat": args.per_heartbeat,
        "rounds": args.rounds,
        "heartbeats_per_s": [round(rate, 1) for rate in rates],
        "median_heartbeats_per_s": round(statistics.median(rates), 1),
        "median_ms_per_heartbeat": round(1000 / statistics.median(rates), 3),
        "command": " ".join(sys.argv),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--servers", type=int, default=200)
    parser.add_argument("--per-heartbeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
