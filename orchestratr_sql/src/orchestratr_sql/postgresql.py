"""The ``postgresql`` plugin (asyncpg): the storage, and the transport of a fleet on
PostgreSQL alone (:mod:`orchestratr_sql.pgtransport`, ``--transport postgresql://...``).

URL: ``postgresql://user:password@host:5432/dbname?schema=name&pool_max=10``
(also ``postgres://``). ``schema`` sets the ``search_path`` and is created by
the migrations if missing, so one database can hold several isolated stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestratr_core.errors import MissingDriver
from orchestratr_core.plugin import hookimpl
from orchestratr_sql.factory import build_storage
from orchestratr_sql.pgdriver import PostgresConnector
from orchestratr_sql.url import DatabaseUrl

if TYPE_CHECKING:
    from orchestratr_core.plugin.manager import BackendSpec
    from orchestratr_core.storage import Storage
    from orchestratr_core.transport import Transport

__all__ = [
    "PostgresConnector",
    "make_connector",
    "orchestratr_make_storage",
    "orchestratr_make_transport",
]


@hookimpl
def orchestratr_make_storage(spec: BackendSpec) -> Storage | None:
    """A PostgreSQL storage for ``spec`` (plugin ``postgresql``)."""
    return build_storage(spec, "postgresql")


@hookimpl
def orchestratr_make_transport(spec: BackendSpec) -> Transport | None:
    """A PostgreSQL transport for ``spec`` (plugin ``postgresql``); asyncpg is imported
    only when it is built."""
    if spec.plugin != "postgresql":
        return None
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        raise MissingDriver("postgresql", "asyncpg", "orchestratr-sql[postgresql]") from None
    from orchestratr_sql.pgtransport import PostgresTransport

    return PostgresTransport(spec.url, **dict(spec.options))


def make_connector(url: DatabaseUrl) -> PostgresConnector:
    """The asyncpg connector for ``url``; :class:`MissingDriver` without asyncpg."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        raise MissingDriver("postgresql", "asyncpg", "orchestratr-sql[postgresql]") from None
    return PostgresConnector(url)
