"""The "infinite" job each system runs in the benchmarks, and the ledger it writes.

Every copy of a job appends one line when its function's first line runs
(``S <key> <unix time> <pid>``) and one when it ends (``E ...``) to a file of its
own process (``$BENCH_LEDGER/<pid>.log``, ``O_APPEND``: one ``write`` per line, so
a ``kill -9`` loses nothing already written and threads never interleave). The
benchmark reads the files afterwards; timings come from the job's own clock
reading, so polling the files adds nothing to a figure.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

_fd: int | None = None
_lock = threading.Lock()

IDLE_SLEEP = float(os.environ.get("BENCH_IDLE_SLEEP", "10"))
"""Seconds an OrchestratR job sleeps between ``heartbeat()`` calls (10 s unless set)."""
POLL_SLEEP = float(os.environ.get("BENCH_POLL_SLEEP", "1"))
"""Seconds a Celery or Dramatiq task sleeps between checks for revocation."""


def _ledger() -> int:
    global _fd  # noqa: PLW0603 - one ledger file per process
    if _fd is None:
        with _lock:
            if _fd is None:
                directory = os.environ["BENCH_LEDGER"]
                _fd = os.open(
                    os.path.join(directory, f"{os.getpid()}.log"),
                    os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                    0o644,
                )
    return _fd


def record(event: str, key: str) -> None:
    """Append ``event`` (``S`` start, ``E`` end) for job ``key`` to the ledger."""
    os.write(_ledger(), f"{event} {key} {time.time():.6f} {os.getpid()}\n".encode())


async def orx_job(arg: Any, token: Any, heartbeat: Callable[[], None]) -> None:
    """OrchestratR: report liveness every ``IDLE_SLEEP`` s until told to stop
    (``token.sleep`` wakes at once on a stop, so no polling is needed)."""
    record("S", arg.name)
    try:
        while True:
            heartbeat()
            if await token.sleep(IDLE_SLEEP):
                break
    finally:
        record("E", arg.name)


def poll_loop(key: str, revoked: Callable[[], bool]) -> None:
    """Celery and Dramatiq: the loop an infinite task runs in a worker thread —
    sleep, then check whether it was revoked (neither can wake a sleeping task)."""
    record("S", key)
    try:
        while not revoked():
            time.sleep(POLL_SLEEP)
    finally:
        record("E", key)
