"""Job functions for ``test_poison.py``, importable by ``orchestratr server --job``."""

from __future__ import annotations

from collections.abc import Callable

from orchestratr_core import JobArgument, StopToken
from tests.chaos.jobs import ledger_job, record


async def nul_error_or_ledger_job(
    arg: JobArgument, token: StopToken, heartbeat: Callable[[], None]
) -> None:
    """A job named ``poison...`` raises an error whose text holds a NUL (as a C
    library or a binary protocol can produce); every other job is the ledger job."""
    if arg.name.startswith("poison"):
        record("start", arg)
        record("stop", arg)
        raise ValueError("bad \x00 byte")
    await ledger_job(arg, token, heartbeat)
