"""The driver contract: pooled connections, transactions, and what an error means.

Each plugin module (``sqlite``, ``postgresql``, ``mysql``, ``sqlserver``) provides
one :class:`Connector` for its driver. The storage logic and the SQL text know
nothing about drivers; a connector knows nothing about jobs.
"""

from __future__ import annotations

import abc
import enum
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from orchestratr_sql.queries import ParamStyle, Query, compile_query
from orchestratr_sql.url import DatabaseUrl

__all__ = ["Connection", "Connector", "ErrorKind", "Row", "python_data_error", "scrub"]

Row = Mapping[str, Any]


class ErrorKind(enum.Enum):
    """What a driver error means for the caller."""

    UNAVAILABLE = "unavailable"
    """The database cannot be reached or the connection broke: retry with backoff."""
    TRANSIENT = "transient"
    """Deadlock, serialization failure, lock timeout: retry the transaction."""
    AUTH = "auth"
    """Wrong user or password: retrying will not help."""
    UNKNOWN_DATABASE = "unknown_database"
    """The database (or schema) does not exist: retrying will not help."""
    UNIQUE = "unique"
    """A unique constraint refused the write."""
    DATA = "data"
    """The database (or the driver, before sending) refused a value: out of its
    column's range, an encoding it cannot store (NUL in PostgreSQL text), too
    long, a check or not-null constraint. Retrying the same write cannot help."""


class Connection(abc.ABC):
    """One connection, inside or outside a transaction."""

    style: ParamStyle

    @abc.abstractmethod
    async def execute(self, query: Query, values: Mapping[str, Any]) -> int:
        """Run a statement; return the number of rows it matched."""

    @abc.abstractmethod
    async def fetch(self, query: Query, values: Mapping[str, Any]) -> list[Row]:
        """Run a query; return its rows as mappings keyed by lower-case column name."""

    @abc.abstractmethod
    async def run_script_statement(self, sql: str) -> None:
        """Run one parameterless statement of a migration script."""

    async def fetch_one(self, query: Query, values: Mapping[str, Any]) -> Row | None:
        """The first row, or ``None``."""
        rows = await self.fetch(query, values)
        return rows[0] if rows else None

    def adhoc(self, name: str, sql: str) -> Query:
        """Compile SQL assembled from fixed fragments (monitor filters)."""
        return _compile_cached(name, sql, self.style)


class Connector(abc.ABC):
    """A pool of connections to one database through one driver."""

    style: ParamStyle
    """The driver's parameter style."""
    product: str
    """Human name of the database, for messages (``PostgreSQL``)."""

    def __init__(self, url: DatabaseUrl) -> None:
        self.url = url

    @abc.abstractmethod
    async def open(self) -> None:
        """Create the pool (and check that the database answers)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection. Idempotent."""

    @abc.abstractmethod
    def transaction(self, *, write: bool = True) -> Any:
        """``async with connector.transaction() as conn``: one transaction,
        committed on success and rolled back on error. ``write`` lets SQLite
        take its write lock at the start (``BEGIN IMMEDIATE``)."""

    def statement(self, *, write: bool = True) -> Any:
        """``async with connector.statement() as conn``: a connection for work
        that is ONE statement, atomic by itself. Drivers that can run it in
        autocommit (PostgreSQL, MySQL) save the ``BEGIN``/``COMMIT`` round trips;
        this default is :meth:`transaction`."""
        return self.transaction(write=write)

    @abc.abstractmethod
    def session(self) -> Any:
        """``async with connector.session() as conn``: one connection in
        autocommit-like use, for migration locks; :meth:`begin`/:meth:`commit`
        on it delimit transactions."""

    @abc.abstractmethod
    async def begin(self, conn: Connection) -> None:
        """Start a transaction on a session connection."""

    @abc.abstractmethod
    async def commit(self, conn: Connection) -> None:
        """Commit the transaction of a session connection."""

    @abc.abstractmethod
    async def rollback(self, conn: Connection) -> None:
        """Roll back the transaction of a session connection."""

    @abc.abstractmethod
    def classify(self, exc: BaseException) -> ErrorKind | None:
        """What ``exc`` means, or ``None`` for an error that is a bug (raise it)."""


def python_data_error(exc: BaseException) -> bool:
    """True for the errors Python or a driver raises while converting a value to
    send, before the database sees it: an integer too large for the column type
    (``OverflowError``), a string that cannot be encoded (a lone surrogate:
    ``UnicodeError``). Every connector classifies these as :attr:`ErrorKind.DATA`."""
    return isinstance(exc, OverflowError | UnicodeError)


_compile_cached = functools.lru_cache(maxsize=512)(compile_query)


def scrub(text: str, secrets: Sequence[str]) -> str:
    """``text`` on one line with every secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return " ".join(text.split())
