"""A fleet on PostgreSQL alone beside the same fleet on RabbitMQ: the ``postgresql``
transport against the ``rabbitmq`` one, taking turns within each round on one machine
(the storage is the same PostgreSQL for both).

    .venv/bin/python -m benchmarks.pg_transport                      # 2 rounds
    .venv/bin/python -m benchmarks.pg_transport --runs 3 --jobs 10000 --footprint 10000

Per round and transport: failover of ``--per-worker`` x 4 jobs after ``kill -9`` of
the server holding the most (seconds until all its jobs run again elsewhere); start
latency (ms from ``create_job`` to the job's first line on an idle server, median of
``--samples``); allocation of ``--jobs`` jobs on four servers (seconds until the last
first line); idle footprint of ``--footprint`` jobs on one server (bytes per job, the
server's CPU and, on PostgreSQL, the CPU of the database backends serving the
transport's sessions, over ``--window`` seconds). Writes
``benchmarks/results/pg_transport.json`` (``--out``) and prints the medians and the
ratios; ``--scenarios failover,latency,allocation,footprint`` picks some.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from benchmarks import scenarios
from benchmarks.common import figure, machine, write_result

_T = TypeVar("_T")
SUBJECTS = ("orchestratr", "orchestratr-pg")
FIGURES = {
    "failover_total_s": "s",
    "latency_run_medians_ms": "ms",
    "allocation_s": "s",
    "footprint_bytes_per_job": "bytes",
    "idle_cpu_pct": "% of one core",
    "idle_db_cpu_pct": "% of one core",
}


async def _again(what: str, call: Callable[[], Awaitable[_T]], tries: int = 3) -> _T:
    """Run one measurement, again if it failed: the shared broker is restarted now
    and then by other tests (a run that saw that is discarded, as ``run.py`` does)."""
    for attempt in range(1, tries + 1):
        try:
            return await call()
        except Exception as exc:
            if attempt == tries:
                raise
            print(f"{what} failed ({exc!r:.200}); discarded, measuring again", flush=True)
            await asyncio.sleep(10)
    raise AssertionError("unreachable")


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """``args.runs`` rounds of every scenario for each subject, in turn."""
    work = Path(tempfile.mkdtemp(prefix="orx-bench-pgtransport-"))
    got: dict[str, dict[str, list[float]]] = {n: {k: [] for k in FIGURES} for n in SUBJECTS}
    for r in range(args.runs):
        # Alternate who goes first: the second of a round starts amid the first's teardown.
        for name in SUBJECTS if r % 2 == 0 else SUBJECTS[::-1]:
            mine = got[name]
            if "failover" in args.scenarios:
                result = await _again(
                    "failover",
                    lambda name=name: scenarios.failover(name, work, per_worker=args.per_worker),  # type: ignore[misc]
                )
                if result["total_s"] is not None:
                    mine["failover_total_s"].append(result["total_s"])
            if "latency" in args.scenarios:
                starts = await _again(
                    "latency",
                    lambda name=name: scenarios.latency(name, work, samples=args.samples),  # type: ignore[misc]
                )
                mine["latency_run_medians_ms"].append(statistics.median(starts) * 1000)
            if "allocation" in args.scenarios:
                alloc = await _again(
                    "allocation",
                    lambda name=name: scenarios.throughput(name, work, jobs=args.jobs, within=300),  # type: ignore[misc]
                )
                mine["allocation_s"].append(alloc["all_running_s"])
            if "footprint" in args.scenarios:
                foot = await _again(
                    "footprint",
                    lambda name=name: scenarios.throughput(  # type: ignore[misc]
                        name, work, jobs=args.footprint, workers=1,
                        footprint_window=args.window, within=300,
                    ),
                )  # fmt: skip
                mine["footprint_bytes_per_job"].append(foot["rss_per_job_bytes"])
                mine["idle_cpu_pct"].append(foot["idle_cpu_pct_total"])
                if "idle_db_cpu_pct" in foot:
                    mine["idle_db_cpu_pct"].append(foot["idle_db_cpu_pct"])
            print(
                f"round {r + 1}/{args.runs} {name}: " + ", ".join(
                    f"{k} {v[-1]:.4g}" for k, v in mine.items() if v
                ),
                flush=True,
            )  # fmt: skip
    out: dict[str, Any] = {
        "per_worker": args.per_worker,
        "samples": args.samples,
        "jobs": args.jobs,
        "footprint_jobs": args.footprint,
        "window_s": args.window,
        "systems": {
            name: {"figures": {k: figure(FIGURES[k], v) for k, v in got[name].items()}}
            for name in SUBJECTS
        },
    }
    base, pg = (out["systems"][n]["figures"] for n in SUBJECTS)
    out["ratios_pg_over_rabbitmq"] = {
        key: round(pg[key]["median"] / base[key]["median"], 3)
        for key in FIGURES
        if base[key].get("median") and pg[key].get("median")
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="rounds (default 2)")
    parser.add_argument("--per-worker", type=int, default=250, help="jobs per server (4 servers)")
    parser.add_argument("--samples", type=int, default=100, help="latency samples per run")
    parser.add_argument("--jobs", type=int, default=10000, help="jobs allocated on 4 servers")
    parser.add_argument("--footprint", type=int, default=10000, help="idle jobs on one server")
    parser.add_argument("--window", type=float, default=20.0, help="idle window, seconds")
    parser.add_argument(
        "--scenarios", default="failover,latency,allocation,footprint", help="which to run"
    )
    parser.add_argument("--out", default="pg_transport", help="results/<out>.json")
    args = parser.parse_args()
    args.scenarios = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    load_before = machine()["load_average"]
    started = time.time()
    payload = asyncio.run(measure(args))
    payload.update(
        command=" ".join(["python -m benchmarks.pg_transport", *sys.argv[1:]]),
        load_average_before=load_before,
        load_average_after=machine()["load_average"],
        duration_s=round(time.time() - started, 1),
    )
    path = write_result(args.out, payload)
    for name, part in payload["systems"].items():
        medians = {k: f.get("median") for k, f in part["figures"].items()}
        print(f"{name}: {medians}")
    print(f"postgresql / rabbitmq: {payload['ratios_pg_over_rabbitmq']}; wrote {path}")


if __name__ == "__main__":
    main()
