"""Rerun the chaos suite several times and record, per fault, how long it took
until every job ran again (or the manager's view converged): median and worst.

    .venv/bin/python benchmarks/chaos_report.py --runs 5 [--slow]

Writes the summary into ``benchmarks/results/chaos.json`` (keeping its
``records``: every figure each chaos test of these runs appends, see
``tests/chaos/harness.py``; routine test runs append to the git-ignored
``chaos-runs.jsonl`` instead) and prints a markdown table for
``docs/reliability.md``. Each run is a fresh pytest process against the real
broker, database and server processes; a run whose invariants fail is counted
and reported as a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# pytest -q prints progress marks (".", "F", "E") on the same line before the output
LINE = re.compile(
    r"^[.FEsx]*(?P<fault>[^:\n]+): (?P<what>[^\n]*?) after (?P<seconds>[0-9.]+) s", re.M
)
RESULT = re.compile(r"(?P<passed>\d+) passed")
FAILED = re.compile(r"(?P<n>\d+) (?:failed|errors?)\b")


def run_once(slow: bool) -> tuple[dict[str, float], int, int, str]:
    """One pytest run of tests/chaos; figures by fault, passed, failed, output tail."""
    marker = "slow or not slow" if slow else "not slow"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "-m", marker, "tests/chaos"],
        cwd=ROOT, capture_output=True, text=True, check=False,
        env={"ORCHESTRATR_CHAOS_RESULTS": "record", **os.environ},  # on purpose: tracked
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    figures = {m["fault"].strip(): float(m["seconds"]) for m in LINE.finditer(out)}
    counts = RESULT.search(out)
    passed = int(counts["passed"]) if counts else 0
    failed = sum(int(m["n"]) for m in FAILED.finditer(out.splitlines()[-1] if out else ""))
    if proc.returncode != 0 and failed == 0:
        failed = 1  # pytest failed without a summary line we understand
    return figures, passed, failed, out[-2000:]


def dump_results(data: dict[str, Any]) -> str:
    """``chaos.json`` as text: the summary indented, one line per record (short diffs)."""
    records = data.get("records", [])
    rest = {k: v for k, v in data.items() if k != "records"}
    if not records:
        return json.dumps({**rest, "records": []}, indent=2) + "\n"
    text = json.dumps({**rest, "records": ["@RECORDS@"]}, indent=2)
    lines = ",\n    ".join(json.dumps(r) for r in records)
    return text.replace('"@RECORDS@"', lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--slow", action="store_true", help="include the slow faults")
    args = parser.parse_args()
    samples: dict[str, list[float]] = {}
    failures = 0
    started = time.time()
    for i in range(args.runs):
        figures, passed, failed, tail = run_once(args.slow)
        failures += failed
        print(f"run {i + 1}/{args.runs}: {passed} passed, {failed} failed", flush=True)
        if failed:
            print(tail)
        for fault, seconds in figures.items():
            samples.setdefault(fault, []).append(seconds)
    result: dict[str, Any] = {
        "command": f"python benchmarks/chaos_report.py --runs {args.runs}"
        + (" --slow" if args.slow else ""),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
        },
        "runs": args.runs,
        "failed_tests": failures,
        "seconds": round(time.time() - started, 1),
        "faults": {
            fault: {
                "unit": "s",
                "samples": len(values),
                "median": round(statistics.median(values), 3),
                "max": round(max(values), 3),
                "values": values,
            }
            for fault, values in sorted(samples.items())
        },
    }
    out = ROOT / "benchmarks" / "results" / "chaos.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        result["records"] = json.loads(out.read_text(encoding="utf-8")).get("records", [])
    out.write_text(dump_results(result), encoding="utf-8")
    print("\n| fault | samples | median (s) | worst (s) |\n|---|---|---|---|")
    for fault, figure in result["faults"].items():
        print(f"| {fault} | {figure['samples']} | {figure['median']} | {figure['max']} |")
    print(f"\nfailed tests over all runs: {failures}; written to {out.relative_to(ROOT)}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
