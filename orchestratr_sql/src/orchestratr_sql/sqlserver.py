"""The ``sqlserver`` storage plugin (aioodbc + an ODBC driver).

URL: ``mssql://user:password@host:1433/dbname?driver=ODBC+Driver+18+for+SQL+Server``;
any other query parameter that is not a storage option is passed on as an ODBC
connection-string keyword (``Encrypt=yes``, ``TrustServerCertificate=yes``).

NOT VERIFIED against a real SQL Server (none could run where this was built):
the T-SQL is parsed by the tests, and this connector -- pool, connection
string, ``?`` parameters, error classification -- is tested against MariaDB and
PostgreSQL through their Debian ODBC drivers, running their own dialect's SQL (the
tests build such a storage themselves: ``SqlStorage(OdbcConnector(url), mysql dialect)``).
See ``docs/sql.md``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import weakref
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
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

__all__ = ["OdbcConnector", "connection_string", "make_connector", "orchestratr_make_storage"]

_AUTH_TEXT = ("login failed", "access denied", "password authentication failed")
_UNKNOWN_DB_TEXT = ("cannot open database", "unknown database", "does not exist")
_UNAVAILABLE_TEXT = (
    "communication link failure",
    "lost connection",
    "gone away",
    "can't connect",
    "could not connect",
    "connection refused",
    "server closed the connection",
    "login timeout",
    "tcp provider",
    "no connection",
    "terminating connection",
    "connection has been closed",
    "connection was killed",
    "connection is closed",
)


@hookimpl
def orchestratr_make_storage(spec: BackendSpec) -> Storage | None:
    """A SQL Server storage for ``spec`` (plugin ``sqlserver``)."""
    return build_storage(spec, "sqlserver")


def make_connector(url: DatabaseUrl) -> OdbcConnector:
    """The aioodbc connector for ``url``; :class:`MissingDriver` without aioodbc
    (or without the unixODBC library pyodbc loads)."""
    try:
        import aioodbc  # noqa: F401
    except ImportError:
        raise MissingDriver("sqlserver", "aioodbc", "orchestratr-sql[sqlserver]") from None
    return OdbcConnector(url)


def _odbc_value(value: str) -> str:
    """Quote a connection-string value when it needs it (``{...}``, ``}`` doubled)."""
    if any(ch in value for ch in ";{}=") or value != value.strip():
        return "{" + value.replace("}", "}}") + "}"
    return value


def connection_string(url: DatabaseUrl) -> str:
    """The ODBC connection string for ``url`` (contains the password: never log it).

    Microsoft's drivers take ``SERVER=host,port``; other drivers (MariaDB,
    PostgreSQL) take ``SERVER=host;PORT=port``.
    """
    driver = url.driver or "ODBC Driver 18 for SQL Server"
    parts: dict[str, str] = {"DRIVER": "{" + driver.replace("}", "}}") + "}"}
    if "sql server" in driver.lower():
        parts["SERVER"] = _odbc_value(f"{url.host},{url.port}")
    else:
        parts["SERVER"] = _odbc_value(url.host or "localhost")
        parts["PORT"] = str(url.port)
    parts["DATABASE"] = _odbc_value(url.database or "")
    if url.user is not None:
        parts["UID"] = _odbc_value(url.user)
    if url.password is not None:
        parts["PWD"] = "{" + url.password.replace("}", "}}") + "}"
    for key, value in url.options.odbc.items():
        parts[key] = _odbc_value(value)
    return ";".join(f"{key}={value}" for key, value in parts.items())


class _OdbcConnection(Connection):
    style: ParamStyle = "qmark"

    def __init__(self, raw: Any, *, times_as_text: bool) -> None:
        self.raw = raw
        self.times_as_text = times_as_text

    def _bind(self, query: Query, values: Mapping[str, Any]) -> tuple[Any, ...]:
        params = query.bind(values)
        if not self.times_as_text:
            return params
        # pyodbc binds datetimes to non-Microsoft drivers without fractional
        # seconds; as ISO text the database converts them exactly.
        return tuple(
            v.isoformat(sep=" ", timespec="microseconds") if isinstance(v, datetime) else v
            for v in params
        )

    async def _cursor(self) -> Any:
        # Not "async with raw.cursor()": aioodbc commits when that block exits,
        # which would split our transactions statement by statement.
        return await self.raw.cursor()

    async def execute(self, query: Query, values: Mapping[str, Any]) -> int:
        cursor = await self._cursor()
        try:
            await cursor.execute(query.text, *self._bind(query, values))
            return max(int(cursor.rowcount), 0)
        finally:
            await cursor.close()

    async def fetch(self, query: Query, values: Mapping[str, Any]) -> list[Row]:
        cursor = await self._cursor()
        try:
            await cursor.execute(query.text, *self._bind(query, values))
            if cursor.description is None:
                return []
            names = [column[0].lower() for column in cursor.description]
            rows = await cursor.fetchall()
        finally:
            await cursor.close()
        return [dict(zip(names, tuple(row), strict=True)) for row in rows]

    async def run_script_statement(self, sql: str) -> None:
        cursor = await self._cursor()
        try:
            await cursor.execute(sql)
        finally:
            await cursor.close()


class OdbcConnector(Connector):
    """An aioodbc pool; connections run with autocommit off, so every
    statement belongs to a transaction that :meth:`commit` ends."""

    style: ParamStyle = "qmark"
    product = "SQL Server"

    def __init__(self, url: DatabaseUrl) -> None:
        super().__init__(url)
        self._pool: Any = None
        self._microsoft = "sql server" in (url.driver or "").lower()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._connection_executors: set[concurrent.futures.ThreadPoolExecutor] = set()

    async def open(self) -> None:
        """Create the pool; its first connection proves the credentials."""
        if self._pool is not None:
            return
        import aioodbc

        options = self.url.options
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=options.pool_max, thread_name_prefix="orchestratr-odbc"
        )
        self._pool = await aioodbc.create_pool(
            dsn=connection_string(self.url),
            minsize=options.pool_min,
            maxsize=options.pool_max,
            autocommit=False,
            timeout=int(options.connect_timeout),
            pool_recycle=3600,
            after_created=self._configure,
            # One thread per connection: a connection blocked on a row lock in
            # the shared default executor could starve the commit it waits for.
            executor=self._executor,
        )

    async def _configure(self, raw: Any) -> None:
        """Character encoding per driver. Microsoft's drivers want pyodbc's
        default (UTF-16 wide strings); others (MariaDB's, PostgreSQL's) mangle
        long wide-string parameters, so talk UTF-8 to them."""
        import pyodbc

        if self._microsoft:
            return
        raw.setdecoding(pyodbc.SQL_CHAR, encoding="utf-8")
        raw.setdecoding(pyodbc.SQL_WCHAR, encoding="utf-8")
        raw.setencoding(encoding="utf-8")

    async def close(self) -> None:
        """Close the pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            with contextlib.suppress(Exception):  # best effort at shutdown
                await asyncio.wait_for(pool.wait_closed(), timeout=5)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        for executor in list(self._connection_executors):
            self._retire_executor(executor)

    def _own_thread(self, raw: Any) -> None:
        """Give an aioodbc connection a thread of its own.

        aioodbc runs every call of every connection on the pool's executor. A task
        cancelled while its statement runs leaves that statement running in its
        thread, and the rollback or close that follows would then run on the same
        ODBC handle from a second thread at once: the MariaDB driver crashed the
        process that way (a segmentation fault at a test's teardown). With one
        single-thread executor per connection its calls run one after the other."""
        own = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="orchestratr-odbc-conn"
        )
        raw._executor = own  # every call of the connection goes through it
        self._connection_executors.add(own)
        weakref.finalize(raw, self._retire_executor, own)

    def _retire_executor(self, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        """Let a connection's thread end once its queued calls ran."""
        self._connection_executors.discard(executor)
        executor.shutdown(wait=False)

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[Any]:
        if self._pool is None:
            raise ConnectionError("storage is closed (call open() first)")
        pool = self._pool
        async with asyncio.timeout(self.url.options.acquire_timeout):
            raw = await pool.acquire()
        if raw._executor is self._executor:
            self._own_thread(raw)
        try:
            yield raw
        except BaseException as exc:
            if self.classify(exc) is ErrorKind.UNAVAILABLE:
                # ODBC connections can look open after the server dropped them.
                with contextlib.suppress(Exception):  # it is broken already
                    await raw.close()
            raise
        finally:
            await pool.release(raw)

    @asynccontextmanager
    async def transaction(self, *, write: bool = True) -> AsyncIterator[Connection]:
        """A pooled connection; commit on success, roll back on error."""
        async with self._acquire() as raw:
            try:
                yield _OdbcConnection(raw, times_as_text=not self._microsoft)
            except BaseException:
                with contextlib.suppress(Exception):  # the connection may be gone
                    await raw.rollback()
                raise
            await raw.commit()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Connection]:
        """A pooled connection for migration locks (commit explicitly)."""
        async with self._acquire() as raw:
            try:
                yield _OdbcConnection(raw, times_as_text=not self._microsoft)
            finally:
                with contextlib.suppress(Exception):  # the connection may be gone
                    await raw.rollback()

    async def begin(self, conn: Connection) -> None:
        """Nothing: with autocommit off the next statement starts a transaction."""

    async def commit(self, conn: Connection) -> None:
        """Commit."""
        assert isinstance(conn, _OdbcConnection)
        await conn.raw.commit()

    async def rollback(self, conn: Connection) -> None:
        """Roll back."""
        assert isinstance(conn, _OdbcConnection)
        await conn.raw.rollback()

    def classify(self, exc: BaseException) -> ErrorKind | None:
        """By SQLSTATE and message: 28000 auth, "cannot open database" unknown
        database, 40001 retry, 23000 duplicate key unique, 08xxx/HYT00 unavailable,
        other 22xxx/23xxx (and pyodbc's DataError, Python's overflow) data."""
        import pyodbc

        if isinstance(exc, pyodbc.Error):
            state = str(exc.args[0]) if exc.args else ""
            text = (str(exc.args[1]) if len(exc.args) > 1 else str(exc)).lower()
            if state in {"28000", "28P01"} or any(t in text for t in _AUTH_TEXT):
                return ErrorKind.AUTH
            if any(t in text for t in _UNKNOWN_DB_TEXT) and "database" in text:
                return ErrorKind.UNKNOWN_DATABASE
            if state in ("40001", "40P01") or "deadlock" in text:
                return ErrorKind.TRANSIENT
            if state in ("23000", "23505") and ("duplicate" in text or "unique" in text):
                return ErrorKind.UNIQUE
            if (
                state.startswith("08")
                or state in ("HYT00", "HYT01", "57P01")
                or any(t in text for t in _UNAVAILABLE_TEXT)
            ):
                return ErrorKind.UNAVAILABLE
            if state.startswith(("22", "23")) or isinstance(exc, pyodbc.DataError):
                # 22001 string right truncation, 22003 out of range, 22007/22008
                # datetime, 22018 bad cast; 23000 a check / not-null / FK violation.
                return ErrorKind.DATA
            return None
        if python_data_error(exc):
            return ErrorKind.DATA
        if isinstance(exc, OSError | ConnectionError | TimeoutError | asyncio.TimeoutError):
            return ErrorKind.UNAVAILABLE
        return None
