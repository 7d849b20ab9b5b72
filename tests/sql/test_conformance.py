"""The core's storage conformance suite on SQLite, PostgreSQL and MariaDB, and
on the aioodbc connector (MariaDB's ODBC driver running the MySQL dialect)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from orchestratr_core.testing import StorageConformance
from orchestratr_sql import SqlStorage


class TestSQLiteConformance(StorageConformance):
    """SQLite file database, fresh per test."""

    @pytest.fixture
    async def storage(self, sqlite_storage: SqlStorage) -> AsyncIterator[SqlStorage]:
        yield sqlite_storage


@pytest.mark.postgresql
class TestPostgresConformance(StorageConformance):
    """PostgreSQL through asyncpg, one schema per run, emptied per test."""

    @pytest.fixture
    async def storage(self, pg_storage: SqlStorage) -> AsyncIterator[SqlStorage]:
        yield pg_storage


@pytest.mark.mysql
class TestMariaDBConformance(StorageConformance):
    """MariaDB through aiomysql, one database per run, emptied per test."""

    @pytest.fixture
    async def storage(self, mysql_storage: SqlStorage) -> AsyncIterator[SqlStorage]:
        yield mysql_storage


@pytest.mark.mysql
class TestOdbcConnectorConformance(StorageConformance):
    """The SQL Server plugin's aioodbc connector (pool, ``?`` parameters,
    transactions, error classification) through MariaDB's ODBC driver, running
    the MySQL dialect: no SQL Server can run here."""

    @pytest.fixture
    async def storage(self, odbc_storage: SqlStorage) -> AsyncIterator[SqlStorage]:
        yield odbc_storage
