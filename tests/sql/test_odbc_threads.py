"""The aioodbc connector never uses one ODBC connection from two threads at once.

A task cancelled while its statement runs leaves the statement running in its
thread; the rollback that follows must wait for it instead of running beside it
on the same handle (the MariaDB ODBC driver crashed the test process that way).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from orchestratr_sql import SqlStorage

pytestmark = pytest.mark.mysql


async def test_a_statement_cancelled_mid_flight_ends_before_its_connection_is_used_again(
    odbc_storage: SqlStorage,
) -> None:
    connector = odbc_storage.connector
    rollback_started: list[float] = []

    async def slow() -> None:
        async with connector.transaction() as conn:
            raw = conn.raw  # type: ignore[attr-defined]
            original = raw.rollback

            async def timed_rollback() -> None:
                rollback_started.append(time.monotonic())
                await original()

            raw.rollback = timed_rollback  # calls through; left for the pool's next user
            await conn.run_script_statement("SELECT SLEEP(1)")

    started = time.monotonic()
    task = asyncio.create_task(slow())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Whatever the cancelled task did next on its connection (close the cursor,
    # roll back) waited for the statement's 1 s instead of running beside it.
    assert rollback_started, "the transaction was not rolled back"
    assert rollback_started[0] - started >= 0.95, rollback_started[0] - started
    # The connection went back to the pool usable.
    async with connector.transaction() as conn:
        await conn.run_script_statement("SELECT 1")
