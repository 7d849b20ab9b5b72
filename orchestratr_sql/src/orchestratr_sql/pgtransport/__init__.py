"""The ``postgresql`` transport: a fleet on PostgreSQL alone (``docs/postgresql-transport.md``).

Shipped with the SQL storage because it shares its driver (asyncpg), its URL parsing
and its error translation; selected with ``--transport postgresql://...`` or
``transport="postgresql"``.
"""

from __future__ import annotations

from orchestratr_sql.pgtransport.settings import PgTransportSettings
from orchestratr_sql.pgtransport.transport import PostgresDelivery, PostgresTransport

__all__ = ["PgTransportSettings", "PostgresDelivery", "PostgresTransport"]
