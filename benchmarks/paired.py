"""Two OrchestratR set-ups compared in turns within each round, on the same broker and
machine: failover after ``kill -9`` and start latency (``signing.py``, ``kinds.py``)."""

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

__all__ = ["measure", "run"]


async def measure(
    subjects: tuple[str, str], runs: int, per_worker: int, samples: int
) -> dict[str, Any]:
    """``runs`` rounds of (failover, latency) for each of the two subjects, in turn;
    ``ratios``: the second's medians over the first's."""
    work = Path(tempfile.mkdtemp(prefix=f"orx-bench-{subjects[1]}-"))
    failover: dict[str, list[float]] = {name: [] for name in subjects}
    latency: dict[str, list[float]] = {name: [] for name in subjects}
    for r in range(runs):
        # Alternate who goes first: the second of a round starts amid the first's teardown.
        for name in subjects if r % 2 == 0 else subjects[::-1]:
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
    for name in subjects:
        out["systems"][name] = {
            "figures": {
                "failover_total_s": figure("s", failover[name]),
                "latency_run_medians_ms": figure("ms", latency[name]),
            }
        }
    base, other = (out["systems"][n]["figures"] for n in subjects)
    out["ratios"] = {
        key: round(other[key]["median"] / base[key]["median"], 3)
        for key in ("failover_total_s", "latency_run_medians_ms")
        if base[key].get("median") and other[key].get("median")
    }
    return out


def run(module: str, result: str, subjects: tuple[str, str], doc: str, ratio: str) -> None:
    """The command line of a paired comparison: parse, measure, write
    ``benchmarks/results/<result>.json``, print the medians and ``ratio`` (a label)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--per-worker", type=int, default=250, help="jobs per server (4 servers)")
    parser.add_argument("--samples", type=int, default=100, help="latency samples per run")
    args = parser.parse_args()
    load_before = machine()["load_average"]
    started = time.time()
    payload = asyncio.run(measure(subjects, args.runs, args.per_worker, args.samples))
    payload.update(
        command=" ".join([f"python -m benchmarks.{module}", *sys.argv[1:]]),
        load_average_before=load_before,
        load_average_after=machine()["load_average"],
        duration_s=round(time.time() - started, 1),
    )
    path = write_result(result, payload)
    for name, part in payload["systems"].items():
        f = part["figures"]
        print(
            f"{name}: failover median {f['failover_total_s'].get('median')} s, "
            f"latency median of run medians {f['latency_run_medians_ms'].get('median')} ms"
        )
    print(f"{ratio}: {payload['ratios']}; wrote {path}")
