"""The job function the chaos tests run in real server processes.

It keeps its own ledger, outside the framework: one JSON line per event in a file
per process (``$ORCHESTRATR_LEDGER_DIR/<pid>.jsonl``), opened in append mode and
flushed per line, so a ``kill -9`` loses nothing the job wrote. (A file rather
than a database table so that the PostgreSQL-restart fault cannot damage the
evidence.) Each copy -- one call of the job function, named by a ``copy`` id of
its own so that two copies in one process can be told apart -- records ``start``,
a ``write`` every ``WRITE_EVERY`` seconds carrying its fencing token, and ``stop``
(also when it is cancelled or fails).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import IO

from orchestratr_core import JobArgument, StopToken
from orchestratr_core.lifecycle import checkpointed, updatable
from orchestratr_core.runner import Heartbeat, UpdatableHeartbeat

WRITE_EVERY = 0.1

_file: IO[str] | None = None


def _ledger() -> IO[str]:
    global _file  # noqa: PLW0603 - one ledger file per process
    if _file is None:
        directory = os.environ["ORCHESTRATR_LEDGER_DIR"]
        _file = open(  # noqa: SIM115 - kept open for the life of the process
            os.path.join(directory, f"{os.getpid()}.jsonl"), "a", buffering=1, encoding="utf-8"
        )
    return _file


def record(event: str, arg: JobArgument, copy: str = "", **extra: object) -> None:
    """Append one ledger line of the copy ``copy``."""
    line = {
        **extra,
        "e": event,
        "copy": copy,
        "job": arg.job_id,
        "name": arg.name,
        "fence": arg.fence,
        "pid": os.getpid(),
        "server": os.environ.get("ORCHESTRATR_SERVER_LABEL", ""),
        "t": time.time(),
        # I7: the kind the copy was run as, and what its server runs and carries.
        "kind": arg.kind,
        "server_kinds": os.environ.get("ORCHESTRATR_SERVER_KINDS", "default"),
        "server_labels": os.environ.get("ORCHESTRATR_SERVER_LABELS", ""),
        # An update's restart: the argument the copy was started with.
        "arg": arg.argument,
    }
    _ledger().write(json.dumps(line) + "\n")


async def ledger_job(arg: JobArgument, token: StopToken, heartbeat: Callable[[], None]) -> None:
    """Run until told to stop, writing to the ledger with the fencing token."""
    copy = uuid.uuid4().hex
    record("start", arg, copy)
    try:
        while not token.stop_requested:
            record("write", arg, copy)
            heartbeat()
            await token.sleep(WRITE_EVERY)
    finally:
        record("stop", arg, copy)


async def stubborn_job(arg: JobArgument, token: StopToken, heartbeat: Callable[[], None]) -> None:
    """Ignores its token (must be cancelled hard)."""
    copy = uuid.uuid4().hex
    record("start", arg, copy)
    try:
        while True:
            record("write", arg, copy)
            heartbeat()
            await asyncio.sleep(WRITE_EVERY)
    finally:
        record("stop", arg, copy)


@checkpointed
async def checkpoint_job(arg: JobArgument, token: StopToken, heartbeat: Heartbeat) -> None:
    """:func:`ledger_job` that records a checkpoint ``"<fence>:<step>"`` with every
    write, and notes in its start line (``cpf``) the token of the owner whose
    checkpoint it started with (I9)."""
    copy = uuid.uuid4().hex
    got = None if arg.checkpoint is None else int(arg.checkpoint.split(":")[0])
    record("start", arg, copy, cpf=got)
    step = 0
    try:
        while not token.stop_requested:
            record("write", arg, copy)
            step += 1
            heartbeat(checkpoint=f"{arg.fence}:{step}")
            await token.sleep(WRITE_EVERY)
    finally:
        record("stop", arg, copy)


@updatable
async def updatable_job(arg: JobArgument, token: StopToken, heartbeat: UpdatableHeartbeat) -> None:
    """:func:`ledger_job` whose function takes a new argument without a restart
    (``@updatable``): each one it takes is an ``update`` line (its ``arg``)."""
    copy = uuid.uuid4().hex
    record("start", arg, copy)
    current = arg.argument
    try:
        while not token.stop_requested:
            latest = heartbeat.argument
            if latest.argument != current:
                current = latest.argument
                record("update", latest, copy)
            record("write", arg, copy)
            heartbeat()
            await token.sleep(WRITE_EVERY)
    finally:
        record("stop", arg, copy)
