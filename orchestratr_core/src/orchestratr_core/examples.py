"""Small example jobs that ship with the core: for the demo and for trying the CLI.

Run one on a server with::

    orchestratr server --job orchestratr_core.examples:ticker --transport amqp://guest:guest@localhost/

The job's argument, if it is a number, is the tick interval in seconds (default 1).
"""

from __future__ import annotations

import logging

from orchestratr_core.job import JobArgument
from orchestratr_core.lifecycle import checkpointed
from orchestratr_core.runner import Heartbeat, StopToken

__all__ = ["DEFAULT_INTERVAL", "blocking_ticker", "tick_interval", "ticker"]

log = logging.getLogger("orchestratr.examples")

DEFAULT_INTERVAL = 1.0
"""Seconds between ticks when the job's argument does not say otherwise."""

_MIN_INTERVAL = 0.01
_MAX_INTERVAL = 3600.0


def tick_interval(argument: str) -> float:
    """The tick interval a ticker job uses for ``argument``.

    A number between 0.01 and 3600 is taken as seconds; anything else (an empty
    argument included) means :data:`DEFAULT_INTERVAL`.
    """
    try:
        value = float(argument)
    except ValueError:
        return DEFAULT_INTERVAL
    if not _MIN_INTERVAL <= value <= _MAX_INTERVAL:  # also rejects nan
        return DEFAULT_INTERVAL
    return value


@checkpointed
async def ticker(arg: JobArgument, token: StopToken, heartbeat: Heartbeat) -> None:
    """An infinite job: log a tick with the job's name and fencing token every
    interval, report liveness with ``heartbeat()``, and return as soon as the
    server asks it to stop."""
    interval = tick_interval(arg.argument)
    ticks = _ticks_from(arg.checkpoint)
    log.info(
        "%s: started (job %s, fence %d, every %gs, from tick %d)",
        arg.name,
        arg.job_id,
        arg.fence,
        interval,
        ticks,
    )
    while not await token.sleep(interval):
        ticks += 1
        heartbeat(checkpoint=str(ticks))  # the next owner goes on counting from here
        log.info("%s: tick %d (fence %d)", arg.name, ticks, arg.fence)
    log.info("%s: stopping after %d ticks (%s)", arg.name, ticks, token.reason)


def _ticks_from(checkpoint: str | None) -> int:
    """The tick count an earlier owner recorded (0 without a usable checkpoint)."""
    return int(checkpoint) if checkpoint is not None and checkpoint.isdigit() else 0


@checkpointed
def blocking_ticker(arg: JobArgument, token: StopToken, heartbeat: Heartbeat) -> None:
    """The blocking variant of :func:`ticker`: a plain function that the server
    runs in a worker thread, waiting with ``token.wait_sync``."""
    interval = tick_interval(arg.argument)
    log.info(
        "%s: started in a thread (job %s, fence %d, every %gs)",
        arg.name,
        arg.job_id,
        arg.fence,
        interval,
    )
    ticks = _ticks_from(arg.checkpoint)
    while not token.wait_sync(interval):
        ticks += 1
        heartbeat(checkpoint=str(ticks))
        log.info("%s: tick %d (fence %d)", arg.name, ticks, arg.fence)
    log.info("%s: stopping after %d ticks (%s)", arg.name, ticks, token.reason)
