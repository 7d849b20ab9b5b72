"""The asyncpg connector: pooled connections, transactions and what an error means.

Shared by the ``postgresql`` storage (:mod:`orchestratr_sql.postgresql`) and the
``postgresql`` transport (:mod:`orchestratr_sql.pgtransport`): one place that knows
how to connect to PostgreSQL and how to read its errors.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from orchestratr_sql.connection import Connection, Connector, ErrorKind, Row, python_data_error
from orchestratr_sql.queries import ParamStyle, Query
from orchestratr_sql.url import DatabaseUrl

__all__ = ["PostgresConnector"]

_AUTH = {"28P01", "28000"}
_UNKNOWN_DATABASE = {"3D000", "3F000"}
_TRANSIENT = {"40001", "40P01", "55P03"}
# 25006: a write reached a server in read-only mode (a standby, or a primary being
# demoted): the next connection goes to the node that accepts writes.
_UNAVAILABLE = {"57P01", "57P02", "57P03", "53300", "53400", "58030", "25006"}


class _PgConnection(Connection):
    style: ParamStyle = "numeric"

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.tx: Any = None

    async def execute(self, query: Query, values: Mapping[str, Any]) -> int:
        status: str = await self.raw.execute(query.text, *query.bind(values))
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def fetch(self, query: Query, values: Mapping[str, Any]) -> list[Row]:
        rows = await self.raw.fetch(query.text, *query.bind(values))
        return [dict(row.items()) for row in rows]

    async def run_script_statement(self, sql: str) -> None:
        await self.raw.execute(sql)


async def _keep_session(connection: Any) -> None:
    """The pool's reset on release: nothing. asyncpg's default sends
    ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` each
    time a connection goes back to the pool -- one more round trip per
    operation. Pooled connections never carry session state here: no ``SET``
    (settings are connection parameters), no ``LISTEN``, no cursors outside a
    transaction, and the one session-level lock (the migration lock) is taken on
    a connection of its own (:meth:`PostgresConnector.session`). An open
    transaction is still rolled back by asyncpg before this is called."""


class PostgresConnector(Connector):
    """An asyncpg pool. READ COMMITTED transactions; the guards in the SQL make
    every change safe under concurrency without stronger isolation."""

    style: ParamStyle = "numeric"
    product = "PostgreSQL"

    def __init__(self, url: DatabaseUrl) -> None:
        super().__init__(url)
        self._pool: Any = None

    def _connect_args(self) -> dict[str, Any]:
        options = self.url.options
        settings = {
            "application_name": "orchestratr",
            "idle_in_transaction_session_timeout": str(
                max(1, round(options.idle_in_transaction_timeout * 1000))
            ),
        }
        if options.schema:
            settings["search_path"] = f'"{options.schema}"'
        hosts = self.url.hosts or ((self.url.host, self.url.port),)
        extra: dict[str, Any] = {}
        if options.target_session_attrs is not None:
            extra["target_session_attrs"] = options.target_session_attrs
        return {
            **extra,
            "host": [host for host, _ in hosts] if len(hosts) > 1 else hosts[0][0],
            "port": [port for _, port in hosts] if len(hosts) > 1 else hosts[0][1],
            "user": self.url.user,
            "password": self.url.password,
            "database": self.url.database,
            "timeout": options.connect_timeout,
            "command_timeout": options.command_timeout,
            "statement_cache_size": options.statement_cache_size,
            "server_settings": settings,
        }

    async def open(self) -> None:
        """Create the pool; its first connection proves the credentials."""
        if self._pool is not None:
            return
        import asyncpg

        options = self.url.options
        self._pool = await asyncpg.create_pool(
            min_size=options.pool_min,
            max_size=options.pool_max,
            reset=_keep_session,
            **self._connect_args(),
        )

    async def close(self) -> None:
        """Close the pool (waiting briefly for connections in use)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except (TimeoutError, Exception):
                pool.terminate()

    def _require(self) -> Any:
        if self._pool is None:
            import asyncpg

            raise asyncpg.InterfaceError("storage is closed (call open() first)")
        return self._pool

    def _drop_if_broken(self, raw: Any, exc: BaseException) -> None:
        """Close a connection an error left unusable, so that the pool (which
        no longer probes connections with a reset query) never hands it out
        again -- e.g. one left mid-protocol by a server restart."""
        if self.classify(exc) is ErrorKind.UNAVAILABLE:
            import asyncpg

            # A connection the server dropped is already closed and detached from
            # its pool proxy, which then raises on any call: that must not hide ``exc``.
            with contextlib.suppress(asyncpg.InterfaceError):
                raw.terminate()

    @asynccontextmanager
    async def transaction(self, *, write: bool = True) -> AsyncIterator[Connection]:
        """A pooled connection in one transaction."""
        pool = self._require()
        async with pool.acquire(timeout=self.url.options.acquire_timeout) as raw:
            try:
                async with raw.transaction():
                    yield _PgConnection(raw)
            except BaseException as exc:
                self._drop_if_broken(raw, exc)
                raise

    @asynccontextmanager
    async def statement(self, *, write: bool = True) -> AsyncIterator[Connection]:
        """A pooled connection in autocommit: one statement is its own
        transaction, without the ``BEGIN`` and ``COMMIT`` round trips."""
        pool = self._require()
        async with pool.acquire(timeout=self.url.options.acquire_timeout) as raw:
            try:
                yield _PgConnection(raw)
            except BaseException as exc:
                self._drop_if_broken(raw, exc)
                raise

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Connection]:
        """A connection of its own (not pooled) in autocommit mode, closed at the
        end: the migration lock is a session-level advisory lock, and closing
        the connection releases it whatever happened (an error, a cancel)."""
        self._require()
        import asyncpg

        raw = await asyncpg.connect(**self._connect_args())
        conn = _PgConnection(raw)
        try:
            yield conn
        except BaseException:
            raw.terminate()
            raise
        try:
            if conn.tx is not None:
                await conn.tx.rollback()
                conn.tx = None
        finally:
            await raw.close()

    async def begin(self, conn: Connection) -> None:
        """Start a transaction on a session connection."""
        assert isinstance(conn, _PgConnection)
        conn.tx = conn.raw.transaction()
        await conn.tx.start()

    async def commit(self, conn: Connection) -> None:
        """Commit the session's transaction, if any."""
        assert isinstance(conn, _PgConnection)
        if conn.tx is not None:
            tx, conn.tx = conn.tx, None
            await tx.commit()

    async def rollback(self, conn: Connection) -> None:
        """Roll back the session's transaction, if any."""
        assert isinstance(conn, _PgConnection)
        if conn.tx is not None:
            tx, conn.tx = conn.tx, None
            await tx.rollback()

    def classify(self, exc: BaseException) -> ErrorKind | None:
        """By SQLSTATE: 28xxx auth, 3D000 unknown database, 40001/40P01 retry,
        23505 unique, 08xxx/57Pxx/53300 unavailable, 22xxx and other 23xxx data;
        25006 (read-only: a standby) unavailable; socket errors and "no host
        accepts writes" (during a failover) unavailable; asyncpg's own argument
        errors data."""
        import asyncpg
        import asyncpg.exceptions._base

        if isinstance(exc, asyncpg.PostgresError):
            state = str(getattr(exc, "sqlstate", "") or "")
            if state.startswith("22") or (state.startswith("23") and state != "23505"):
                # Data exception (22021 invalid byte sequence: NUL; 22003 out of
                # range...) or a check / not-null / foreign-key violation.
                return ErrorKind.DATA
            if state in _AUTH:
                return ErrorKind.AUTH
            if state in _UNKNOWN_DATABASE:
                return ErrorKind.UNKNOWN_DATABASE
            if state in _TRANSIENT:
                return ErrorKind.TRANSIENT
            if state == "23505":
                return ErrorKind.UNIQUE
            if state.startswith("08") or state in _UNAVAILABLE:
                return ErrorKind.UNAVAILABLE
            return None
        if isinstance(exc, asyncpg.exceptions._base.DataError) or python_data_error(exc):
            # asyncpg refused to encode an argument ("value out of int64 range").
            return ErrorKind.DATA
        if isinstance(exc, asyncpg.InterfaceError):
            text = str(exc).lower()
            if "closed" in text or "connection" in text or "pool" in text:
                return ErrorKind.UNAVAILABLE
            return None
        if isinstance(exc, asyncpg.InternalClientError):
            # A connection left mid-protocol by a server restart ("cannot switch
            # to state 15; another operation is in progress"), or no host of the
            # URL accepts writes (TargetServerAttributeNotMatched: the primary is
            # dead, the standby not yet promoted): retry on another.
            return ErrorKind.UNAVAILABLE
        if isinstance(exc, OSError | ConnectionError | TimeoutError | asyncio.TimeoutError):
            return ErrorKind.UNAVAILABLE
        return None
