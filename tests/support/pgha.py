"""The PostgreSQL primary/standby pair of ``.ci/infra postgres-ha`` for the
failover tests: started once per test session (stopped and removed after, when
that session started it),
brought back to a synchronous pair before each test that uses it, failed over
on demand. Its ports are its own (55432, 55433); the :5432 service is never
touched."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / ".ci" / "infra"


def infra(*args: str, timeout: float = 180) -> str:
    """``bash .ci/infra postgres-ha ARGS``; its standard output (raises with its
    error output on failure)."""
    done = subprocess.run(
        ["bash", str(INFRA), "postgres-ha", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f".ci/infra postgres-ha {' '.join(args)} failed: {done.stderr[-800:]}")
    return done.stdout


async def infra_async(*args: str) -> str:
    """:func:`infra` without blocking the event loop."""
    return await asyncio.to_thread(infra, *args)


@dataclass
class PostgresHA:
    """The running pair: its multi-host URL and the faults it offers."""

    url: str
    """``postgresql://postgres@127.0.0.1:55432,127.0.0.1:55433/orchestratr?target_session_attrs=read-write``"""

    def with_schema(self, schema: str) -> str:
        """The storage URL with ``schema`` as search path."""
        return f"{self.url}&schema={schema}"

    async def failover(self) -> tuple[float, float]:
        """Kill the primary (immediate stop) and promote the standby: (when the
        kill was asked, when the new primary accepted writes)."""
        asked = time.time()
        await infra_async("failover")
        return asked, time.time()

    async def rejoin(self) -> None:
        """The killed node follows the new primary; replication synchronous again."""
        await infra_async("rejoin")

    async def primary_port(self) -> int:
        """The port of the node that is primary now."""
        return int((await infra_async("primary")).split()[-1])

    async def sql(self, statement: str) -> None:
        """Run one statement on the primary."""
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()


@pytest.fixture(scope="session")
def postgres_ha_session() -> Iterator[PostgresHA]:
    """``bash .ci/infra postgres-ha up`` once per session; ``down`` after, unless it
    was running already (then whoever started it brings it down: another test
    session, or someone using it by hand)."""
    try:
        infra("primary")
    except RuntimeError:
        ours = True
    else:
        ours = False
    url = infra("up").strip().splitlines()[-1]
    try:
        yield PostgresHA(url)
    finally:
        if ours:
            infra("down")


@pytest.fixture
async def postgres_ha(postgres_ha_session: PostgresHA) -> AsyncIterator[PostgresHA]:
    """The pair, both nodes up and replicating synchronously (a node a previous
    test killed has rejoined as the standby)."""
    await infra_async("up")
    yield postgres_ha_session


@pytest.fixture
async def ha_schema(postgres_ha: PostgresHA) -> AsyncIterator[str]:
    """A storage URL on the pair in a schema of its own, dropped after the test."""
    schema = f"orx_ha_{uuid.uuid4().hex[:10]}"
    yield postgres_ha.with_schema(schema)
    await infra_async("up")
    await postgres_ha.sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
