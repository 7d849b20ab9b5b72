"""Fixtures of the PostgreSQL transport tests: one schema per run (dropped at the
end), one namespace (table prefix) per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from orchestratr_sql.pgtransport import PostgresTransport
from tests.support.sql import drop_pg_schema, pg_url, unique_name


@pytest.fixture(scope="session")
def pgtransport_url() -> Iterator[str]:
    """A URL whose schema is this run's, dropped after the run."""
    schema = unique_name("pgtr")
    try:
        yield pg_url(schema)
    finally:
        drop_pg_schema(schema)


@pytest.fixture
def pg_namespace() -> str:
    """A table prefix unique to the test."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def make_pg_transport(
    pgtransport_url: str, pg_namespace: str
) -> AsyncIterator[Callable[..., PostgresTransport]]:
    """Builds unconnected transports on the test's namespace; closes them after."""
    made: list[PostgresTransport] = []

    def make(**options: Any) -> PostgresTransport:
        options.setdefault("namespace", pg_namespace)
        transport = PostgresTransport(pgtransport_url, **options)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        await transport.close()
