"""The ``sqlite`` storage plugin (aiosqlite): the embedded default.

URLs: ``sqlite:///relative.db``, ``sqlite:////absolute/path.db``,
``sqlite:///:memory:`` (one shared connection: every connection to ``:memory:``
would otherwise get its own empty database). Files use WAL journaling; each
write transaction starts with ``BEGIN IMMEDIATE`` so writers queue on the
database lock (``busy_timeout``) instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestratr_core.backend_urls import DEFAULT_SQLITE_URL
from orchestratr_core.errors import MissingDriver
from orchestratr_core.plugin import hookimpl
from orchestratr_sql.connection import Connection, Connector, ErrorKind, Row, python_data_error
from orchestratr_sql.factory import build_storage
from orchestratr_sql.queries import ParamStyle, Query
from orchestratr_sql.url import DatabaseUrl

if TYPE_CHECKING:
    import aiosqlite

    from orchestratr_core.plugin.manager import BackendSpec
    from orchestratr_core.storage import Storage

__all__ = ["DEFAULT_URL", "SQLiteConnector", "make_connector", "orchestratr_make_storage"]

DEFAULT_URL = DEFAULT_SQLITE_URL
"""Where the ``sqlite`` plugin keeps its data when given no URL: the CLI's default file."""


@hookimpl
def orchestratr_make_storage(spec: BackendSpec) -> Storage | None:
    """A SQLite storage for ``spec`` (plugin ``sqlite``)."""
    return build_storage(spec, "sqlite", DEFAULT_URL)


def make_connector(url: DatabaseUrl) -> SQLiteConnector:
    """The aiosqlite connector for ``url``; :class:`MissingDriver` without aiosqlite."""
    try:
        import aiosqlite  # noqa: F401
    except ImportError:
        raise MissingDriver("sqlite", "aiosqlite", "orchestratr-sql[sqlite]") from None
    return SQLiteConnector(url)


class _SQLiteConnection(Connection):
    style: ParamStyle = "qmark"

    def __init__(self, raw: aiosqlite.Connection) -> None:
        self.raw = raw

    async def execute(self, query: Query, values: Mapping[str, Any]) -> int:
        async with self.raw.execute(query.text, query.bind(values)) as cursor:
            return max(cursor.rowcount, 0)

    async def fetch(self, query: Query, values: Mapping[str, Any]) -> list[Row]:
        async with self.raw.execute(query.text, query.bind(values)) as cursor:
            rows = list(await cursor.fetchall())
            description = cursor.description or ()
            names = [column[0].lower() for column in description]
        if not names:
            return []
        return [dict(zip(names, row, strict=True)) for row in rows]

    async def run_script_statement(self, sql: str) -> None:
        await self.raw.execute(sql)


class SQLiteConnector(Connector):
    """A small pool of aiosqlite connections (one for ``:memory:``)."""

    style: ParamStyle = "qmark"
    product = "SQLite"

    def __init__(self, url: DatabaseUrl) -> None:
        super().__init__(url)
        self._size = 1 if url.in_memory else url.options.pool_max
        self._idle: list[aiosqlite.Connection] = []
        self._all: set[aiosqlite.Connection] = set()
        self._slots: asyncio.Semaphore | None = None

    async def open(self) -> None:
        """Open the first connection (creating the file) to fail early."""
        if self._slots is not None:
            return
        database = self.url.database or ""
        if not self.url.in_memory and not _directory_of(database).is_dir():
            raise sqlite3.OperationalError("unable to open database file (no such directory)")
        self._slots = asyncio.Semaphore(self._size)
        self._idle.append(await self._connect())

    async def close(self) -> None:
        """Close every connection."""
        connections, self._all, self._idle = list(self._all), set(), []
        self._slots = None
        for conn in connections:
            with contextlib.suppress(Exception):  # closing a broken connection
                await conn.close()

    async def _connect(self) -> aiosqlite.Connection:
        import aiosqlite

        options = self.url.options
        conn = await aiosqlite.connect(
            self.url.database or ":memory:",
            timeout=options.acquire_timeout,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
        )
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(options.acquire_timeout * 1000)}")
            await conn.execute("PRAGMA foreign_keys = ON")
            if not self.url.in_memory:
                await conn.execute("PRAGMA journal_mode = WAL")
                await conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            await conn.close()
            raise
        self._all.add(conn)
        return conn

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[aiosqlite.Connection]:
        if self._slots is None:
            raise sqlite3.OperationalError("storage is closed (call open() first)")
        slots = self._slots
        async with asyncio.timeout(self.url.options.acquire_timeout):
            await slots.acquire()
        conn: aiosqlite.Connection | None = None
        try:
            conn = self._idle.pop() if self._idle else await self._connect()
            yield conn
        finally:
            if conn is not None and conn in self._all:
                self._idle.append(conn)
            slots.release()

    @asynccontextmanager
    async def transaction(self, *, write: bool = True) -> AsyncIterator[Connection]:
        """``BEGIN IMMEDIATE`` for writes (take the write lock first: no
        deadlock-prone lock upgrade), ``BEGIN`` for reads."""
        async with self._acquire() as raw:
            await raw.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield _SQLiteConnection(raw)
            except BaseException:
                if raw.in_transaction:
                    await raw.rollback()
                raise
            await raw.commit()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Connection]:
        """One connection outside any transaction."""
        async with self._acquire() as raw:
            try:
                yield _SQLiteConnection(raw)
            finally:
                if raw.in_transaction:
                    await raw.rollback()

    async def begin(self, conn: Connection) -> None:
        """Start a transaction (``BEGIN IMMEDIATE``)."""
        await _raw(conn).execute("BEGIN IMMEDIATE")

    async def commit(self, conn: Connection) -> None:
        """Commit if a transaction is open."""
        raw = _raw(conn)
        if raw.in_transaction:
            await raw.commit()

    async def rollback(self, conn: Connection) -> None:
        """Roll back if a transaction is open."""
        raw = _raw(conn)
        if raw.in_transaction:
            await raw.rollback()

    def classify(self, exc: BaseException) -> ErrorKind | None:
        """Locked/busy: transient. Cannot open the file: unknown database. A
        constraint other than unique, or a value SQLite cannot take: data."""
        if isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc):
            return ErrorKind.UNIQUE
        if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError) or python_data_error(exc):
            # CHECK / NOT NULL, a value too big ("Python int too large to convert
            # to SQLite INTEGER" is an OverflowError), a lone surrogate.
            return ErrorKind.DATA
        if isinstance(exc, sqlite3.OperationalError):
            text = str(exc).lower()
            if "locked" in text or "busy" in text:
                return ErrorKind.TRANSIENT
            if "unable to open" in text:
                return ErrorKind.UNKNOWN_DATABASE
            if "disk i/o" in text:
                return ErrorKind.UNAVAILABLE
        if isinstance(exc, TimeoutError):
            return ErrorKind.TRANSIENT
        return None


def _directory_of(database: str) -> Path:
    return Path(database).resolve().parent


def _raw(conn: Connection) -> aiosqlite.Connection:
    assert isinstance(conn, _SQLiteConnection)
    return conn.raw
