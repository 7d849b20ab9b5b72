# Over 600 lines: every scenario on every system, run and recorded from one command line.
"""Benchmarks of OrchestratR beside Celery and Dramatiq on one RabbitMQ.

    .venv/bin/python -m benchmarks.run            # full (make bench)
    .venv/bin/python -m benchmarks.run --quick    # under 10 minutes (make bench-quick)
    .venv/bin/python -m benchmarks.run --scenarios failover,latency --runs 5
    .venv/bin/python -m benchmarks.report         # docs/benchmarks.md and charts only

Scenarios: failover, silent_loss, latency, throughput, footprint, manager_load.
Each writes ``benchmarks/results/<scenario>.json`` (every figure with unit,
samples, median, p99, max; versions; machine and load) and the report is
regenerated from all result files at the end. The systems are measured in turn
within each round (A B C, A B C, ...) so that a change in the machine's load
touches all of them alike. Every run uses queue names (and a PostgreSQL schema)
of its own and deletes them; every process is killed in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks import scenarios
from benchmarks.common import (
    AMQP,
    BROKER_LOG,
    RESULTS,
    SYSTEMS,
    consumer_timeout_ms,
    delete_broker_objects,
    figure,
    machine,
    write_result,
)
from benchmarks.systems import CLASSES

FLOOR_SCRIPT = Path(__file__).resolve().parent / "rabbitmq_failover.py"

# Sizes per mode. Quick mode finishes in under 10 minutes on 2 cores.
MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "failover": {"per_worker": 200, "runs": 3},
        "silent_loss": {"per_worker": 100, "runs": 2, "settings": ["tight"]},
        "latency": {"samples": 100, "runs": 2},
        "throughput": {"sizes": [2000], "runs": 2},
        "footprint": {"jobs": 2000, "window": 10.0, "runs": 2},
        "manager_load": {"jobs": 20000, "window": 20.0, "runs": 1, "intervals": [2.0]},
    },
    "full": {
        "failover": {"per_worker": 1000, "runs": 5},
        "silent_loss": {"per_worker": 1000, "runs": 3, "settings": ["tight", "default"]},
        "latency": {"samples": 300, "runs": 3},
        # A peer that has not started every job within `within` seconds is recorded
        # as failing (Celery stalled at 8,150 of 10,000 tasks with room to spare).
        "throughput": {"sizes": [10000, 100000], "runs": 3, "runs_large": 1, "within": 300},
        "footprint": {"jobs": 10000, "window": 30.0, "runs": 3, "within": 180},
        "manager_load": {"jobs": 100000, "window": 60.0, "runs": 2, "intervals": [2.0, 10.0]},
    },
}
SCENARIOS = ("failover", "silent_loss", "latency", "throughput", "footprint", "manager_load")
TIGHT_HEARTBEAT = 5
"""Tightest safe AMQP heartbeat: RabbitMQ's docs warn that values under 5 s give
false positives (a busy but live peer declared dead)."""

CANNOT: dict[str, dict[str, str]] = {
    "manager_load": {
        "celery": "no manager and no per-task heartbeat: Celery keeps no record of running "
        "tasks beyond worker events (which carry no per-task liveness)",
        "dramatiq": "no manager and no per-task heartbeat: Dramatiq keeps no record of "
        "running messages at all",
    },
}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


async def guarded(what: str, call: Callable[[], Awaitable[Any]], limit: float) -> Any:
    """Run one measurement with a time bound; an error is recorded, not raised. A
    run during which RabbitMQ was restarted (another team's fault-injection suite
    shares this broker) measures that restart, not the system: it is discarded and
    run again, twice at most."""
    for attempt in range(3):
        short = await asyncio.to_thread(short_consumer_timeout)
        if short:
            log(f"{what}: the broker's consumer_timeout is {short} ms now (someone's test set "
                "it): every job held longer is torn away; waiting 30 s")  # fmt: skip
            DISTURBED[what] = DISTURBED.get(what, 0) + 1
            await asyncio.sleep(30)
            continue
        mark = broker_log_size()
        try:
            result = await asyncio.wait_for(call(), limit)
        except Exception as exc:
            log(f"{what}: FAILED {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=3)
            result = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        restarts = broker_restarts_since(mark)
        short = await asyncio.to_thread(short_consumer_timeout)
        if not restarts and not short:
            return result
        log(f"{what}: RabbitMQ/PostgreSQL restarted {restarts}x (consumer_timeout {short}) "
            "during the run; discarded")  # fmt: skip
        DISTURBED[what] = DISTURBED.get(what, 0) + 1
        if attempt < 2:
            await asyncio.sleep(5)
    return {"error": "disturbed in every attempt (broker restarted or consumer_timeout shortened)"}


DISTURBED: dict[str, int] = {}
"""Runs discarded because the broker restarted under them, per measurement."""


def short_consumer_timeout() -> int | None:
    """The broker's global consumer_timeout in ms when it is under 10 minutes."""
    match = re.search(r"\{ok,\s*(\d+)\}", consumer_timeout_ms())
    if match and int(match.group(1)) < 600_000:
        return int(match.group(1))
    return None


PG_LOG = Path(os.environ.get("BENCH_POSTGRES_LOG", "/var/log/postgresql/postgresql-15-main.log"))
"""PostgreSQL's log, read to notice restarts of the database during a run."""
RESTART_MARKS = ((BROKER_LOG, b"Successfully stopped RabbitMQ"), (PG_LOG, b"shutdown request"))


def broker_log_size() -> list[int]:
    """Where the broker's and the database's logs end now."""
    marks = []
    for path, _ in RESTART_MARKS:
        try:
            marks.append(path.stat().st_size)
        except OSError:
            marks.append(-1)
    return marks


def broker_restarts_since(marks: list[int]) -> int:
    """Restarts of RabbitMQ or PostgreSQL logged since ``marks``."""
    count = 0
    for (path, needle), mark in zip(RESTART_MARKS, marks, strict=True):
        if mark < 0:
            continue
        try:
            with path.open("rb") as f:
                f.seek(mark)
                count += f.read().count(needle)
        except OSError:
            pass
    return count


def settings_of(names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        system = CLASSES[name](None, Path(), "x", heartbeat=None)  # type: ignore[arg-type]
        out[name] = system.settings()
    return out


THREAD_PER_TASK = ("celery", "dramatiq")
"""Peers whose pool runs each task on an OS thread of its own (Celery's threads
pool, Dramatiq's worker threads)."""


def pid_max() -> int:
    return int(Path("/proc/sys/kernel/pid_max").read_text())


def thread_room() -> int:
    """Threads that may still be started on this machine (pid_max less those alive)."""
    alive = int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])
    return pid_max() - alive - 1000


def floor_run(queue_type: str, messages: int) -> float | None:
    """One run of the bare broker's floor (``rabbitmq_failover.py``, by its author)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "floor.json"
        proc = subprocess.run(
            [sys.executable, str(FLOOR_SCRIPT), "--runs", "1", "--messages", str(messages),
             "--queue-type", queue_type, "--out", str(out), "--url", AMQP],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if proc.returncode != 0 or not out.exists():
            log(f"floor {queue_type} failed: {proc.stderr[-500:]}")
            return None
        return float(json.loads(out.read_text())[f"floor_{queue_type}"]["runs_s"][0])


# -- scenarios ----------------------------------------------------------------------------


async def run_failover(cfg: dict[str, Any], names: list[str], work: Path) -> dict[str, Any]:
    runs: dict[str, list[Any]] = {n: [] for n in names}
    floors: dict[str, list[float]] = {"quorum": [], "classic": []}
    for r in range(cfg["runs"]):
        for queue_type, values in floors.items():
            value = await asyncio.to_thread(floor_run, queue_type, cfg["per_worker"])
            if value is not None:
                values.append(value)
        for name in names:
            log(f"failover {name} run {r + 1}/{cfg['runs']} ({cfg['per_worker']} jobs/worker)")
            res = await guarded(
                f"failover {name}",
                lambda name=name: scenarios.failover(name, work, per_worker=cfg["per_worker"]),
                600,
            )
            runs[name].append(res)
            if "total_s" in res:
                log(f"  -> {res['total_s']}")
    systems = {}
    for name in names:
        ok = [r for r in runs[name] if r.get("total_s") is not None]
        systems[name] = {
            "figures": {
                "total_s": figure("s", [r["total_s"] for r in ok]),
                "per_job_s": figure("s", [t for r in ok for t in r["per_job_s"]]),
                "jobs_on_victim": figure("jobs", [r["jobs_on_victim"] for r in ok]),
            },
            "runs": _trim(runs[name]),
        }
    return {
        "what": "kill -9 of one of four workers each running N jobs; seconds until all of its "
        "jobs run again elsewhere (first line of the job function)",
        "per_worker": cfg["per_worker"],
        "floor": {
            "what": "benchmarks/rabbitmq_failover.py: a plain aio-pika consumer holding N unacked "
            "messages is killed; seconds until a waiting consumer has them all",
            "quorum_s": figure("s", floors["quorum"]),
            "classic_s": figure("s", floors["classic"]),
        },
        "systems": systems,
    }


async def run_silent_loss(cfg: dict[str, Any], names: list[str], work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "what": "one of four workers cut off from the broker by a silent partition (a TCP proxy "
        "that stops forwarding, no FIN/RST); seconds until all of its jobs run elsewhere, and "
        "how many jobs had a second copy running at the same time",
        "per_worker": cfg["per_worker"],
        "variants": {},
    }
    for setting in cfg["settings"]:
        runs: dict[str, list[Any]] = {n: [] for n in names}
        for r in range(cfg["runs"]):
            for name in names:
                heartbeat = TIGHT_HEARTBEAT if setting == "tight" else None
                hb = heartbeat or CLASSES[name].default_heartbeat
                log(f"silent loss {name} {setting} (heartbeat {hb} s) run {r + 1}/{cfg['runs']}")
                res = await guarded(
                    f"silent loss {name}",
                    lambda name=name, heartbeat=heartbeat, hb=hb: scenarios.failover(
                        name, work, per_worker=cfg["per_worker"], partition=True,
                        heartbeat=heartbeat, within=4 * hb + 30,
                    ),
                    8 * hb + 400,
                )  # fmt: skip
                res["heartbeat_s"] = hb
                runs[name].append(res)
                log(f"  -> total {res.get('total_s')} second copies {res.get('second_copies')}")
        systems = {}
        for name in names:
            ok = [r for r in runs[name] if "moved" in r]
            done = [r for r in ok if r.get("total_s") is not None]
            systems[name] = {
                "heartbeat_s": runs[name][0]["heartbeat_s"] if runs[name] else None,
                "figures": {
                    "total_s": figure("s", [r["total_s"] for r in done]),
                    "second_copies": figure("jobs", [r["second_copies"] for r in ok]),
                    "second_copy_overlap_s": figure(
                        "s", [max(r["overlap_s"]) for r in ok if r["overlap_s"]]
                    ),
                    "old_copy_stopped_s": figure(
                        "s", [max(r["old_copies_stop_s"]) for r in ok if r["old_copies_stop_s"]]
                    ),
                    "jobs_on_victim": figure("jobs", [r["jobs_on_victim"] for r in ok]),
                },
                "runs": _trim(runs[name]),
            }
        out["variants"][setting] = {"systems": systems}
    return out


async def run_latency(cfg: dict[str, Any], names: list[str], work: Path) -> dict[str, Any]:
    runs: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(cfg["runs"]):
        for name in names:
            log(f"latency {name} run {r + 1}/{cfg['runs']} ({cfg['samples']} jobs, one at a time)")
            res = await guarded(
                f"latency {name}",
                lambda name=name: scenarios.latency(name, work, samples=cfg["samples"]),
                600,
            )
            runs[name].append([x * 1000 for x in res] if isinstance(res, list) else res)
    systems = {}
    for name in names:
        ok = [r for r in runs[name] if isinstance(r, list)]
        pooled = [x for r in ok for x in r]
        systems[name] = {
            "figures": {
                "latency_ms": figure("ms", pooled),
                "run_medians_ms": figure("ms", [sorted(r)[len(r) // 2] for r in ok]),
            },
            "errors": [r for r in runs[name] if not isinstance(r, list)],
        }
    return {
        "what": "submit one job at a time to an idle worker (create_job / send_task / "
        "actor.send), 20 ms apart; ms from the call to the job function's first line",
        "samples_per_run": cfg["samples"],
        "systems": systems,
    }


async def run_throughput(cfg: dict[str, Any], names: list[str], work: Path) -> dict[str, Any]:
    sizes: dict[str, Any] = {}
    for size in cfg["sizes"]:
        count = cfg["runs"] if size <= 10000 else cfg.get("runs_large", 1)
        runs: dict[str, list[Any]] = {n: [] for n in names}
        for r in range(count):
            for name in names:
                room = thread_room()
                if name in THREAD_PER_TASK and size > room:
                    why = (
                        f"cannot: one OS thread per running task, and this machine has room for "
                        f"{room:,} more threads (kernel.pid_max {pid_max():,} counts every thread)"
                    )
                    log(f"throughput {name} {size} jobs: {why}")
                    runs[name].append({"error": why})
                    continue
                log(f"throughput {name} {size} jobs run {r + 1}/{count}")
                res = await guarded(
                    f"throughput {name}",
                    lambda name=name, size=size: scenarios.throughput(
                        name, work, jobs=size, within=cfg.get("within", 1800),
                    ),
                    2400,
                )  # fmt: skip
                runs[name].append(res)
                log(f"  -> {res.get('all_running_s')} s (submit {res.get('submit_s')} s)")
        sizes[str(size)] = {
            name: {
                "figures": {
                    "all_running_s": figure(
                        "s", [r["all_running_s"] for r in runs[name] if "all_running_s" in r]
                    ),
                    "submit_s": figure("s", [r["submit_s"] for r in runs[name] if "submit_s" in r]),
                },
                "runs": runs[name],
            }
            for name in names
        }
    return {
        "what": "create N jobs (one client, four workers of capacity N/4 x 1.1); seconds from "
        "the first submission until every job's first line ran",
        "sizes": sizes,
    }


async def run_footprint(cfg: dict[str, Any], names: list[str], work: Path) -> dict[str, Any]:
    runs: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(cfg["runs"]):
        for name in names:
            log(f"footprint {name} run {r + 1}/{cfg['runs']} ({cfg['jobs']} jobs on one worker)")
            res = await guarded(
                f"footprint {name}",
                lambda name=name: scenarios.throughput(
                    name,
                    work,
                    jobs=cfg["jobs"],
                    workers=1,
                    footprint_window=cfg["window"],
                    within=cfg.get("within", 900),
                ),
                1800,
            )
            runs[name].append(res)
            log(
                f"  -> {res.get('rss_per_job_bytes')} B/job, idle CPU "
                f"{res.get('idle_cpu_pct_total')} %"
            )
    systems = {}
    for name in names:
        ok = [r for r in runs[name] if "rss_per_job_bytes" in r]
        systems[name] = {
            "figures": {
                "rss_per_job_bytes": figure("bytes", [r["rss_per_job_bytes"] for r in ok]),
                "rss_delta_per_job_bytes": figure(
                    "bytes", [r["rss_delta_per_job_bytes"] for r in ok]
                ),
                "idle_cpu_pct": figure("% of one core", [r["idle_cpu_pct_total"] for r in ok]),
            },
            "runs": runs[name],
        }
    return {
        "what": "one worker holding N idle running jobs: (its RSS - RSS of the same worker "
        "started with room for one job) / N, and the worker's CPU over a window while the jobs "
        "idle; also (RSS with N jobs - RSS of the same worker idle just before) / N",
        "jobs": cfg["jobs"],
        "window_s": cfg["window"],
        "systems": systems,
    }


async def run_manager_load(cfg: dict[str, Any], names: list[str], work: Path) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    for interval in cfg["intervals"]:
        runs: list[Any] = []
        for r in range(cfg["runs"]):
            log(
                f"manager load: {cfg['jobs']} jobs, server heartbeat every {interval} s, "
                f"run {r + 1}/{cfg['runs']}"
            )
            res = await guarded(
                "manager load",
                lambda interval=interval: scenarios.manager_sim(
                    work, jobs=cfg["jobs"], interval=interval, window=cfg["window"]
                ),
                1200,
            )
            runs.append(res)
            log(
                f"  -> manager {res.get('manager_cpu_pct')} % of a core, keeps up "
                f"{res.get('keeps_up')}, backlog {res.get('events_backlog_start')} -> "
                f"{res.get('events_backlog_end')}"
            )
        ok = [r for r in runs if "manager_cpu_pct" in r]
        variants[f"{cfg['jobs']} jobs, every {interval:g} s"] = {
            "jobs": cfg["jobs"],
            "server_heartbeat_interval_s": interval,
            "figures": {
                "manager_cpu_pct": figure("% of one core", [r["manager_cpu_pct"] for r in ok]),
                "backlog_growth_per_min": figure(
                    "messages/min", [r["backlog_growth_per_min"] for r in ok]
                ),
                "manager_rss_bytes": figure("bytes", [r["manager_rss_bytes"] for r in ok]),
            },
            "keeps_up": [r["keeps_up"] for r in ok],
            "runs": runs,
        }
    return {
        "what": "CPU of the manager process (PostgreSQL storage) while N jobs run on four "
        "servers, each job calling heartbeat() every 10 s. The servers are simulated: the N "
        "rows are loaded with sql_storage.py's COPY loader and each server's heartbeat "
        "message (every job of it, as a real server sends) is published every interval; a "
        "real 100,000-job cluster does not fit on this machine (see scenario 4). 'Keeps up' "
        "= the events queue did not grow over the window",
        "jobs": cfg["jobs"],
        "window_s": cfg["window"],
        "variants": variants,
    }


MERGED = {"silent_loss": "variants", "throughput": "sizes", "manager_load": "variants"}
"""Scenarios whose parts may be measured by separate invocations (the 100,000-job
allocation, the minutes-long default-heartbeat partitions): a part measured now
replaces the same part in the file; the other parts are kept, each stamped with
when, under which load and by which command it was measured."""


def merge_earlier(scenario: str, payload: dict[str, Any]) -> None:
    key = MERGED.get(scenario)
    if key is None:
        return
    stamp = {
        "at": machine()["at"],
        "load_average_before": payload["load_average_before"],
        "load_average_after": machine()["load_average"],
        "command": payload["command"],
        "mode": payload["mode"],
    }
    for part in payload[key].values():
        part.setdefault("measured", stamp)
    path = RESULTS / f"{scenario}.json"
    if not path.exists():
        return
    try:
        earlier = json.loads(path.read_text()).get(key, {})
    except ValueError:
        return
    for name, part in earlier.items():
        if name not in payload[key] and "measured" in part:
            payload[key][name] = part
            log(f"{scenario}: kept {key} {name} measured {part['measured']['at']}")


def _trim(runs: list[Any]) -> list[Any]:
    """Per-job lists are summarised in the figures; keep the raw runs small."""
    out = []
    for run in runs:
        if isinstance(run, dict):
            out.append(
                {
                    k: ([round(x, 4) for x in v] if isinstance(v, list) and len(v) > 50 else v)
                    for k, v in run.items()
                }
            )
        else:
            out.append(run)
    return out


RUNNERS = {
    "failover": run_failover,
    "silent_loss": run_silent_loss,
    "latency": run_latency,
    "throughput": run_throughput,
    "footprint": run_footprint,
    "manager_load": run_manager_load,
}


async def main_async(args: argparse.Namespace) -> None:
    mode = "quick" if args.quick else "full"
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS)) + sorted(set(names) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown scenario or system: {unknown}")
    command = " ".join(["python -m benchmarks.run", *sys.argv[1:]])
    started = time.time()
    log(f"mode {mode}; machine {machine()}")
    work = Path(tempfile.mkdtemp(prefix="orx-bench-"))
    for scenario in chosen:
        cfg = dict(MODES[mode][scenario])
        if args.runs:
            cfg["runs"] = args.runs
        for item in args.set or []:
            key, _, value = item.partition("=")
            sc, _, field = key.rpartition(".")
            if sc in ("", scenario):
                cfg[field] = json.loads(value)
        load_before = machine()["load_average"]
        t0 = time.time()
        subjects = names if scenario != "manager_load" else ["orchestratr"]
        payload = await RUNNERS[scenario](cfg, subjects, work)
        payload.update(
            discarded_runs_broker_restarted=dict(DISTURBED),
            mode=mode,
            config=cfg,
            command=command,
            load_average_before=load_before,
            duration_s=round(time.time() - t0, 1),
            settings=settings_of(subjects),
            cannot=CANNOT.get(scenario, {}),
        )
        DISTURBED.clear()
        merge_earlier(scenario, payload)
        path = write_result(scenario, payload)
        log(f"{scenario}: {path} ({payload['duration_s']} s)")
    if "celery" in names:
        # Celery >= 5.5 declares shared topology of its own for quorum queues
        # (native delayed delivery: celery_delayed_*) and for remote control.
        for prefix in ("celery_delayed_", "celery.pidbox", "reply.celery.pidbox"):
            await delete_broker_objects(prefix)
    from benchmarks import report

    report.main()
    log(f"done in {time.time() - started:.0f} s; work files in {work}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under 10 minutes")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--runs", type=int, default=0, help="override the runs per figure")
    parser.add_argument(
        "--set", action="append", metavar="SCENARIO.KEY=JSON",
        help="override one size, e.g. failover.per_worker=1000 or throughput.sizes=[10000]",
    )  # fmt: skip
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    asyncio.run(_interruptible(main_async(args)))


async def _interruptible(work: Awaitable[None]) -> None:
    """SIGTERM and SIGINT cancel the run, so every ``finally`` kills its processes
    and deletes its queues (a shell's background job ignores SIGINT: use SIGTERM)."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log("interrupted: processes killed, queues and schemas removed")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
