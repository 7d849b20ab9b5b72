"""Shared pieces of the benchmarks: statistics, machine and version records,
process groups that are always cleaned up, the ledger reader, broker and
database housekeeping. Only 127.0.0.1 is ever contacted."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
BROKER_PORT = int(os.environ.get("BENCH_BROKER_PORT", "5672"))
"""RabbitMQ's AMQP port on 127.0.0.1 (``BENCH_BROKER_PORT``; a node of one's own
keeps a shared broker's fault-injection tests out of the figures)."""
RABBITMQ_NODE = os.environ.get("BENCH_RABBITMQ_NODE", "")
"""``rabbitmqctl -n`` node name of that broker (``BENCH_RABBITMQ_NODE``)."""
BROKER_LOG = Path(os.environ.get("BENCH_RABBITMQ_LOG", "/var/log/rabbitmq/rabbit@localhost.log"))
"""The broker's log, read to notice restarts during a run (``BENCH_RABBITMQ_LOG``)."""
AMQP = f"amqp://guest:guest@127.0.0.1:{BROKER_PORT}/"


def rabbitmqctl(*args: str) -> list[str]:
    """The argv of a ``rabbitmqctl`` call on the benchmarks' broker."""
    return ["rabbitmqctl", *(["-n", RABBITMQ_NODE] if RABBITMQ_NODE else []), *args]


def consumer_timeout_ms() -> str:
    """The broker's global delivery acknowledgement timeout (3.10: only global)."""
    out = _cmd(rabbitmqctl("eval", "application:get_env(rabbit, consumer_timeout)."))
    return out or "?"


PG_ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
SYSTEMS = ("orchestratr", "celery", "dramatiq")


# -- statistics ------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def figure(unit: str, samples: Iterable[float], *, note: str | None = None) -> dict[str, Any]:
    """One figure: its unit, the samples and their summary."""
    values = [float(v) for v in samples]
    out: dict[str, Any] = {"unit": unit, "n": len(values)}
    if values:
        out.update(
            median=_round(statistics.median(values)),
            p99=_round(percentile(values, 99)),
            max=_round(max(values)),
            min=_round(min(values)),
        )
    out["samples"] = [_round(v) for v in values]
    if note:
        out["note"] = note
    return out


def _round(value: float) -> float:
    return float(f"{value:.6g}")


# -- machine and versions ----------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Cores, memory and load of this machine, now."""
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """Versions of everything involved."""
    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in (
        "orchestratr-core",
        "orchestratr-rabbitmq",
        "orchestratr-sql",
        "aio-pika",
        "aiormq",
        "asyncpg",
        "celery",
        "kombu",
        "amqp",
        "dramatiq",
        "pika",
    ):
        out[dist] = _version(dist)
    out["rabbitmq"] = _cmd(rabbitmqctl("version")) or "?"
    out["rabbitmq_node"] = RABBITMQ_NODE or "default node"
    out["rabbitmq_port"] = BROKER_PORT
    out["rabbitmq_consumer_timeout"] = consumer_timeout_ms()
    out["postgresql"] = _cmd(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", "show server_version", "test"]
    )
    return out


def _cmd(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def write_result(scenario: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<scenario>.json`` with machine and versions."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{scenario}.json"
    doc = {"scenario": scenario, "machine": machine(), "versions": versions(), **payload}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process in a process group of its own."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


@dataclass
class Procs:
    """Every process a benchmark starts; :meth:`close` kills their groups."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=full_env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - one C call, no lock, no import
        )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def python(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        return self.spawn(name, [sys.executable, *args], env)

    def kill9(self, proc: Proc) -> float:
        """``kill -9`` the process itself (not its group); when it happened."""
        at = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        return at

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL it after ``timeout``."""
        if proc.alive and timeout > 0:
            proc.signal_group(signal.SIGCONT)
            proc.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=timeout)
        proc.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=10)

    def close(self) -> None:
        """Kill every group, hard (benchmarks never leave workers behind)."""
        for proc in self.procs:
            proc.signal_group(signal.SIGCONT)
            proc.signal_group(signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)
        self.procs.clear()


def _die_with_parent() -> None:
    """In the child: SIGKILL when the benchmark process dies, however it dies."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _libc() -> Any:
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_bytes(pid: int) -> int:
    """Resident set size of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# -- the ledger ----------------------------------------------------------------------------


@dataclass
class Copy:
    """One copy of a job, as the ledger shows it."""

    key: str
    pid: int
    start: float
    end: float | None = None


class Ledger:
    """Reads the ledger files the jobs write (see ``workloads.py``), incrementally."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}
        self.copies: list[Copy] = []
        self._open: dict[tuple[int, str], Copy] = {}
        self.first_start: dict[str, float] = {}

    def poll(self) -> int:
        """Read what was appended; returns the number of new lines."""
        count = 0
        for path in self.directory.glob("*.log"):
            offset = self._offsets.get(path, 0)
            with path.open("rb") as f:
                f.seek(offset)
                data = self._partial.pop(path, b"") + f.read()
                self._offsets[path] = f.tell()
            lines = data.split(b"\n")
            if lines[-1]:
                self._partial[path] = lines[-1]
            for raw in lines[:-1]:
                event, key, t, pid = raw.decode().split()
                count += 1
                self._apply(event, key, float(t), int(pid))
        return count

    def _apply(self, event: str, key: str, t: float, pid: int) -> None:
        if event == "S":
            copy = Copy(key, pid, t)
            self.copies.append(copy)
            self._open[(pid, key)] = copy
            self.first_start.setdefault(key, t)
        elif event == "E":
            copy = self._open.pop((pid, key), None)
            if copy is not None:
                copy.end = t

    def running(self, *, exclude_pids: set[int] | frozenset[int] = frozenset()) -> dict[str, Copy]:
        """Open copies per key (the latest), outside ``exclude_pids``."""
        out: dict[str, Copy] = {}
        for (pid, key), copy in self._open.items():
            if pid not in exclude_pids:
                out[key] = copy
        return out

    def open_counts(self) -> dict[str, int]:
        """How many copies of each key are open (started, not ended)."""
        out: dict[str, int] = {}
        for _, key in self._open:
            out[key] = out.get(key, 0) + 1
        return out

    def started_after(self, t: float, *, exclude_pids: set[int]) -> dict[str, float]:
        """Earliest start after ``t`` per key, outside ``exclude_pids``."""
        out: dict[str, float] = {}
        for copy in self.copies:
            if (
                copy.start >= t
                and copy.pid not in exclude_pids
                and (copy.key not in out or copy.start < out[copy.key])
            ):
                out[copy.key] = copy.start
        return out


# -- housekeeping --------------------------------------------------------------------------


def run_id() -> str:
    return uuid.uuid4().hex[:6]


async def delete_broker_objects(prefix: str) -> list[str]:
    """Delete every queue and exchange whose name starts with ``prefix``."""
    import aio_pika

    deleted: list[str] = []
    names = {
        kind: await asyncio.to_thread(
            _cmd, rabbitmqctl(f"list_{kind}", "-q", "--no-table-headers", "name")
        )
        or ""
        for kind in ("queues", "exchanges")
    }
    connection = await aio_pika.connect(AMQP)
    try:
        for kind, text in names.items():
            for name in text.split():
                if not name.startswith(prefix):
                    continue
                channel = await connection.channel()
                try:
                    if kind == "queues":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
                    deleted.append(name)
                except Exception:
                    pass
                with contextlib.suppress(Exception):
                    await channel.close()
    finally:
        await connection.close()
    return deleted


async def create_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    finally:
        await conn.close()


async def drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
