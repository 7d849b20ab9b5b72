"""The ``mysql`` storage plugin (aiomysql): MySQL 8 and MariaDB 10.6+.

URL: ``mysql://user:password@host:3306/dbname?pool_max=10`` (also ``mariadb://``).
Connections ask for "found rows" so that an UPDATE reports the rows it matched,
and run at READ COMMITTED, which keeps InnoDB gap locks (and deadlocks) rare.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from orchestratr_core.errors import MissingDriver
from orchestratr_core.plugin import hookimpl
from orchestratr_sql.connection import Connection, Connector, ErrorKind, Row, python_data_error
from orchestratr_sql.factory import build_storage
from orchestratr_sql.queries import ParamStyle, Query
from orchestratr_sql.url import DatabaseUrl

if TYPE_CHECKING:
    from orchestratr_core.plugin.manager import BackendSpec
    from orchestratr_core.storage import Storage

__all__ = ["MySQLConnector", "make_connector", "orchestratr_make_storage"]

_CLIENT_FOUND_ROWS = 2
"""pymysql.constants.CLIENT.FOUND_ROWS: affected rows count rows matched."""
_AUTH = {1044, 1045, 1698, 1251}
_UNKNOWN_DATABASE = {1049}
_TRANSIENT = {1205, 1213, 1020}
_UNIQUE = {1062, 1586}
_DATA = {
    1048,  # column cannot be null
    1264,  # out of range value for column
    1265,  # data truncated
    1292,  # incorrect datetime (or other) value
    1300,  # invalid utf8 string
    1366,  # incorrect string value (an encoding the column cannot store)
    1367,  # illegal value during parsing
    1406,  # data too long for column
    1416,  # cannot get geometry object (wrong type)
    1452,  # a foreign key constraint fails
    1690,  # BIGINT value out of range
    3819,  # check constraint violated (MySQL)
    4025,  # CONSTRAINT_FAILED (MariaDB)
}
"""Error numbers of a value the database refused: retrying cannot help."""
_UNAVAILABLE = {1040, 1053, 1927, 2002, 2003, 2005, 2006, 2013, 2014, 2055, 4031}


@hookimpl
def orchestratr_make_storage(spec: BackendSpec) -> Storage | None:
    """A MySQL/MariaDB storage for ``spec`` (plugin ``mysql``)."""
    return build_storage(spec, "mysql")


def make_connector(url: DatabaseUrl) -> MySQLConnector:
    """The aiomysql connector for ``url``; :class:`MissingDriver` without aiomysql."""
    try:
        import aiomysql  # noqa: F401
    except ImportError:
        raise MissingDriver("mysql", "aiomysql", "orchestratr-sql[mysql]") from None
    return MySQLConnector(url)


@functools.cache
def _quiet_cursor() -> Any:
    """A cursor that does not fetch and re-raise server notes as Python
    warnings (``CREATE TABLE IF NOT EXISTS`` notes; one round trip less). The
    session runs in strict mode, so data problems are errors, not warnings."""
    import aiomysql

    class QuietCursor(aiomysql.Cursor):  # type: ignore[misc]
        async def _show_warnings(self, conn: Any) -> None:
            return None

    return QuietCursor


class _MySQLConnection(Connection):
    style: ParamStyle = "format"

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    async def execute(self, query: Query, values: Mapping[str, Any]) -> int:
        async with self.raw.cursor(_quiet_cursor()) as cursor:
            await cursor.execute(query.text, query.bind(values))
            return max(int(cursor.rowcount), 0)

    async def fetch(self, query: Query, values: Mapping[str, Any]) -> list[Row]:
        async with self.raw.cursor(_quiet_cursor()) as cursor:
            await cursor.execute(query.text, query.bind(values))
            if cursor.description is None:
                return []
            names = [column[0].lower() for column in cursor.description]
            rows = await cursor.fetchall()
        return [dict(zip(names, row, strict=True)) for row in rows]

    async def run_script_statement(self, sql: str) -> None:
        async with self.raw.cursor(_quiet_cursor()) as cursor:
            await cursor.execute(sql)


class MySQLConnector(Connector):
    """An aiomysql pool (autocommit outside explicit transactions)."""

    style: ParamStyle = "format"
    product = "MySQL"

    def __init__(self, url: DatabaseUrl) -> None:
        super().__init__(url)
        self._pool: Any = None

    async def open(self) -> None:
        """Create the pool; its first connection proves the credentials."""
        if self._pool is not None:
            return
        import aiomysql

        options = self.url.options
        self._pool = await aiomysql.create_pool(
            host=self.url.host or "localhost",
            port=self.url.port or 3306,
            user=self.url.user or "root",
            password=self.url.password or "",
            db=self.url.database,
            minsize=options.pool_min,
            maxsize=options.pool_max,
            connect_timeout=options.connect_timeout,
            autocommit=True,
            charset="utf8mb4",
            client_flag=_CLIENT_FOUND_ROWS,
            init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            pool_recycle=3600,
        )

    async def close(self) -> None:
        """Close the pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            try:
                await asyncio.wait_for(pool.wait_closed(), timeout=5)
            except (TimeoutError, Exception):
                pool.terminate()

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[Any]:
        if self._pool is None:
            import aiomysql

            raise aiomysql.InterfaceError(0, "storage is closed (call open() first)")
        pool = self._pool
        async with asyncio.timeout(self.url.options.acquire_timeout):
            raw = await pool.acquire()
        try:
            yield raw
        except BaseException as exc:
            if self.classify(exc) is ErrorKind.UNAVAILABLE:
                raw.close()  # never hand a broken connection to the next caller
            raise
        finally:
            pool.release(raw)

    @asynccontextmanager
    async def transaction(self, *, write: bool = True) -> AsyncIterator[Connection]:
        """A pooled connection in one transaction."""
        async with self._acquire() as raw:
            await raw.begin()
            try:
                yield _MySQLConnection(raw)
            except BaseException:
                try:
                    await raw.rollback()
                except Exception:
                    raw.close()
                raise
            await raw.commit()

    @asynccontextmanager
    async def statement(self, *, write: bool = True) -> AsyncIterator[Connection]:
        """A pooled connection in autocommit mode (the pool's default): one
        statement is its own transaction, without ``BEGIN``/``COMMIT``."""
        async with self._acquire() as raw:
            yield _MySQLConnection(raw)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Connection]:
        """A pooled connection in autocommit mode."""
        async with self._acquire() as raw:
            yield _MySQLConnection(raw)

    async def begin(self, conn: Connection) -> None:
        """``BEGIN`` (DDL still commits implicitly in MySQL)."""
        assert isinstance(conn, _MySQLConnection)
        await conn.raw.begin()

    async def commit(self, conn: Connection) -> None:
        """``COMMIT``."""
        assert isinstance(conn, _MySQLConnection)
        await conn.raw.commit()

    async def rollback(self, conn: Connection) -> None:
        """``ROLLBACK``."""
        assert isinstance(conn, _MySQLConnection)
        await conn.raw.rollback()

    def classify(self, exc: BaseException) -> ErrorKind | None:
        """By MySQL error number: 1045 auth, 1049 unknown database, 1213/1205
        retry, 1062 unique, 2003/2006/2013 unavailable, 1264/1366/1406/... data
        (:data:`_DATA`); socket errors unavailable."""
        import aiomysql

        if isinstance(exc, aiomysql.MySQLError):
            code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
            if code in _AUTH:
                return ErrorKind.AUTH
            if code in _UNKNOWN_DATABASE:
                return ErrorKind.UNKNOWN_DATABASE
            if code in _TRANSIENT:
                return ErrorKind.TRANSIENT
            if code in _UNIQUE:
                return ErrorKind.UNIQUE
            if code in _UNAVAILABLE or isinstance(exc, aiomysql.InterfaceError):
                return ErrorKind.UNAVAILABLE
            if code in _DATA or isinstance(exc, aiomysql.DataError):
                return ErrorKind.DATA
            return None
        if python_data_error(exc):
            return ErrorKind.DATA
        if isinstance(exc, OSError | ConnectionError | TimeoutError | asyncio.TimeoutError):
            return ErrorKind.UNAVAILABLE
        return None
