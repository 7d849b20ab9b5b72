"""What four job kinds cost OrchestratR: failover after ``kill -9`` and start
latency, one kind (the default pool: one jobs queue) against four kinds (four
pools: four quorum queues, four consumers per server), taking turns within each
round on the same broker and machine (so the ratio compares like with like).

    .venv/bin/python -m benchmarks.kinds                 # 3 rounds, 1,000 jobs
    .venv/bin/python -m benchmarks.kinds --runs 5 --per-worker 250 --samples 100

Failover: four servers with ``--per-worker`` jobs each (1,000 jobs in the fleet by
default), the one holding the most is killed; seconds until all its jobs run again.
Latency: ms from ``create_job`` to the job function's first line on an idle server
(median of ``--samples`` jobs per run). Writes ``benchmarks/results/kinds.json``
and prints the medians and the four-kinds/one-kind ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import scenarios
from benchmarks.common import figure, machine, write_result

SUBJECTS = ("orchestratr", "orchestratr-kinds4")


async def measure(runs: int, per_worker: int, samples: int) -> dict[str, Any]:
    """``runs`` rounds of (failover, latency) for each subject, in turn."""
    work = Path(tempfile.mkdtemp(prefix="orx-bench-kinds-"))
    failover: dict[str, list[float]] = {name: [] for name in SUBJECTS}
    latency: dict[str, list[float]] = {name: [] for name in SUBJECTS}
    for r in range(runs):
        # Alternate who goes first: the second of a round starts amid the first's teardown.
        for name in SUBJECTS if r % 2 == 0 else SUBJECTS[::-1]:
            result = await scenarios.failover(name, work, per_worker=per_worker)
            if result["total_s"] is not None:
                failover[name].append(result["total_s"])
            starts = await scenarios.latency(name, work, samples=samples)
            latency[name].append(statistics.median(starts) * 1000)
            print(
                f"round {r + 1}/{runs} {name}: failover {result['total_s']} s, "
                f"latency median {latency[name][-1]:.2f} ms",
                flush=True,
            )
    out: dict[str, Any] = {"per_worker": per_worker, "samples": samples, "systems": {}}
    for name in SUBJECTS:
        out["systems"][name] = {
            "figures": {
                "failover_total_s": figure("s", failover[name]),
                "latency_run_medians_ms": figure("ms", latency[name]),
            }
        }
    base, kinds = (out["systems"][n]["figures"] for n in SUBJECTS)
    out["ratios"] = {
        key: round(kinds[key]["median"] / base[key]["median"], 3)
        for key in ("failover_total_s", "latency_run_medians_ms")
        if base[key].get("median") and kinds[key].get("median")
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--per-worker", type=int, default=250, help="jobs per server (4 servers)")
    parser.add_argument("--samples", type=int, default=100, help="latency samples per run")
    args = parser.parse_args()
    load_before = machine()["load_average"]
    started = time.time()
    payload = asyncio.run(measure(args.runs, args.per_worker, args.samples))
    payload.update(
        command=" ".join(["python -m benchmarks.kinds", *sys.argv[1:]]),
        load_average_before=load_before,
        load_average_after=machine()["load_average"],
        duration_s=round(time.time() - started, 1),
    )
    path = write_result("kinds", payload)
    for name, part in payload["systems"].items():
        f = part["figures"]
        print(
            f"{name}: failover median {f['failover_total_s'].get('median')} s, "
            f"latency median of run medians {f['latency_run_medians_ms'].get('median')} ms"
        )
    print(f"four kinds / one kind: {payload['ratios']}; wrote {path}")


if __name__ == "__main__":
    main()
