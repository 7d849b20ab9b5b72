"""The core's transport conformance suite, run against the PostgreSQL transport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from orchestratr_core.testing import TransportConformance
from orchestratr_core.testing.transport_suite import QueueKind, RawPublisher, TransportFactory
from orchestratr_sql.pgtransport import PostgresTransport

pytestmark = pytest.mark.postgresql


class TestPostgresTransport(TransportConformance):
    """One namespace per test, in this run's schema."""

    @pytest.fixture
    async def transport_factory(
        self, make_pg_transport: Callable[..., PostgresTransport]
    ) -> TransportFactory:
        return make_pg_transport

    @pytest.fixture
    async def raw_publisher(
        self, make_pg_transport: Callable[..., PostgresTransport]
    ) -> AsyncIterator[RawPublisher]:
        writer = make_pg_transport()
        await writer.connect()
        s = writer.settings

        async def publish(kind: QueueKind, payload: bytes) -> None:
            table = s.table(kind)
            channel = f"{s.channel}_{kind}"
            sql = (
                f"WITH ins AS (INSERT INTO {table} (payload) VALUES ($1) RETURNING id) "
                f"SELECT pg_notify($2, '') FROM ins"
            )
            await writer._call(lambda conn: conn.execute(sql, payload, channel), "raw publish")

        yield publish
