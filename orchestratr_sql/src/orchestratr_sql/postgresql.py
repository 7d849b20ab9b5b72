"""The ``postgresql`` plugin (asyncpg): the storage, and the transport of a fleet on
PostgreSQL alone (:mod:`orchestratr_sql.pgtransport`, ``--transport postgresql://...``).

URL: ``postgresql://user:password@host:5432/dbname?schema=name&pool_max=10``
(also ``postgres://``). ``schema`` sets the ``search_path`` and is created by
the migrations if missing, so one database can hold several isolated stores.

A primary with standbys: name every node, comma-separated, as libpq does --
``postgresql://user:password@db1:5432,db2:5432/dbname`` -- and every new
connection goes to the first one that accepts writes
(``target_session_attrs=read-write``, the default when several hosts are
named; ``primary`` or ``any`` may be given instead). After a failover the
connections to the old primary break, the operation in flight is retried whole
(``retries``, ``retry_initial``, ``retry_max``) on a connection to the promoted
node, and if the promotion takes longer than those attempts the caller gets
:class:`~orchestratr_core.errors.BackendUnavailable` -- a transient error after
which nothing of that operation was applied, or (a lost commit acknowledgement)
all of it, never a part: every operation is one transaction.
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
