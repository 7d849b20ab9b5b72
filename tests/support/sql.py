"""Databases, helpers and fixtures of the SQL storage tests.

Each test run gets its own PostgreSQL schema and its own MariaDB database,
dropped at the end; SQLite tests use files under ``tmp_path``. The services are
expected at 127.0.0.1 (CI starts them): a test fails loudly when one is down.
Override with ``ORCHESTRATR_TEST_PG`` / ``ORCHESTRATR_TEST_MYSQL`` (URLs
without a database name: ``postgresql://postgres@127.0.0.1:5432``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from orchestratr_core.job import utcnow
from orchestratr_core.protocol import RunningJob, ServerHeartbeat
from orchestratr_sql import SqlStorage
from orchestratr_sql import storage_from_url as sql_storage_from_url
from orchestratr_sql.dialect import get_dialect
from orchestratr_sql.factory import make_connector
from orchestratr_sql.url import parse_url

PG_SERVER = os.environ.get("ORCHESTRATR_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
PG_DATABASE = os.environ.get("ORCHESTRATR_TEST_PG_DB", "test")
MYSQL_SERVER = os.environ.get("ORCHESTRATR_TEST_MYSQL", "mysql://root@127.0.0.1:3306")
RUN_ID = uuid.uuid4().hex[:10]

TABLES_IN_DELETE_ORDER = ("outbox", "jobs", "servers", "leases")


TEST_DIALECT_OPTION = "sql_dialect"
"""The tests' own URL option: on an ``mssql://`` URL, run this dialect's SQL through
the aioodbc connector (the SQL Server plugin's, tested against MariaDB)."""


def storage_from_url(url: str, **options: Any) -> SqlStorage:
    """:func:`orchestratr_sql.storage_from_url`, plus :data:`TEST_DIALECT_OPTION`."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    dialect = dict(query).get(TEST_DIALECT_OPTION)
    if dialect is None:
        return sql_storage_from_url(url, **options)
    rest = [(key, value) for key, value in query if key != TEST_DIALECT_OPTION]
    parsed = parse_url(urlunsplit(parts._replace(query=urlencode(rest))), options)
    connector, _ = make_connector(parsed)
    connector.product = f"{dialect} via ODBC"
    return SqlStorage(connector, get_dialect(dialect))


def unique_name(prefix: str) -> str:
    """A schema/database name unique to this run and call."""
    return f"orx_{prefix}_{RUN_ID}_{uuid.uuid4().hex[:6]}"


def heartbeat(
    server: str, jobs: list[tuple[str, int]], *, beat: float | None = None, restarts: int = 0
) -> ServerHeartbeat:
    """A heartbeat of ``server`` running ``jobs`` as (job id, fence) pairs."""
    now = utcnow().timestamp()
    return ServerHeartbeat(
        server_id=server,
        name=server,
        max_workers=len(jobs) + 1,
        started_at=now,
        sent_at=now,
        jobs=tuple(
            RunningJob(job_id=job_id, fence=fence, last_heartbeat=beat, restarts=restarts)
            for job_id, fence in jobs
        ),
    )


def pg_url(schema: str, **params: object) -> str:
    """A URL of the test database with ``schema`` as search path."""
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    return f"{PG_SERVER}/{PG_DATABASE}?schema={schema}{extra}"


def mysql_url(database: str, **params: object) -> str:
    """A URL of ``database`` on the test MariaDB."""
    extra = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{MYSQL_SERVER}/{database}" + (f"?{extra}" if extra else "")


async def pg_admin(sql: str) -> None:
    """Run one statement on the test database (outside the storage)."""
    import asyncpg

    from orchestratr_sql.url import parse_url

    url = parse_url(f"{PG_SERVER}/{PG_DATABASE}")
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.user, password=url.password, database=url.database
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def mysql_admin(sql: str) -> None:
    """Run one statement on the test MariaDB server (no database selected)."""
    import aiomysql

    from orchestratr_sql.url import parse_url

    url = parse_url(f"{MYSQL_SERVER}/mysql")
    conn = await aiomysql.connect(
        host=url.host, port=url.port, user=url.user or "root", password=url.password or ""
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute(sql)
        await conn.commit()
    finally:
        conn.close()


def run_sync(coro: Any) -> Any:
    """Run ``coro`` to completion from sync code, even while an event loop runs
    in this thread (session fixtures requested from async fixtures)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def drop_pg_schema(schema: str) -> None:
    """Drop a test schema (sync, for fixture teardown)."""
    run_sync(pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def drop_mysql_database(database: str) -> None:
    """Drop a test database (sync, for fixture teardown)."""
    run_sync(mysql_admin(f"DROP DATABASE IF EXISTS `{database}`"))


def create_mysql_database(database: str) -> None:
    """Create an empty test database (sync)."""
    run_sync(mysql_admin(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4"))


@pytest.fixture(scope="session")
def pg_run_url() -> Iterator[str]:
    """A PostgreSQL schema for this run (migrated by the first storage), dropped after."""
    schema = unique_name("pg")
    try:
        yield pg_url(schema)
    finally:
        drop_pg_schema(schema)


@pytest.fixture(scope="session")
def mysql_run_url() -> Iterator[str]:
    """A MariaDB database for this run, dropped after."""
    database = unique_name("my")
    create_mysql_database(database)
    try:
        yield mysql_url(database)
    finally:
        drop_mysql_database(database)


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema name for one test, dropped after."""
    schema = unique_name("pgt")
    try:
        yield schema
    finally:
        drop_pg_schema(schema)


@pytest.fixture
def mysql_database() -> Iterator[str]:
    """A fresh, empty MariaDB database for one test, dropped after."""
    database = unique_name("myt")
    create_mysql_database(database)
    try:
        yield database
    finally:
        drop_mysql_database(database)


async def wipe(storage: SqlStorage) -> None:
    """Delete every row (the schema stays): an empty store for the next test."""
    async with storage.connector.transaction() as conn:
        for table in TABLES_IN_DELETE_ORDER:
            await conn.run_script_statement(f"DELETE FROM {table}")


@pytest.fixture
async def sqlite_storage(tmp_path: object) -> AsyncIterator[SqlStorage]:
    """An opened SQLite storage on a fresh file."""
    storage = storage_from_url(f"sqlite:///{tmp_path}/orchestratr.db")
    await storage.open()
    yield storage
    await storage.close()


@pytest.fixture
async def pg_storage(pg_run_url: str) -> AsyncIterator[SqlStorage]:
    """An opened, emptied PostgreSQL storage in this run's schema."""
    storage = storage_from_url(pg_run_url, pool_max=5)
    await storage.open()
    await wipe(storage)
    yield storage
    await storage.close()


@pytest.fixture
async def mysql_storage(mysql_run_url: str) -> AsyncIterator[SqlStorage]:
    """An opened, emptied MariaDB storage in this run's database."""
    storage = storage_from_url(mysql_run_url, pool_max=5)
    await storage.open()
    await wipe(storage)
    yield storage
    await storage.close()


ODBC_MARIADB_DRIVER = os.environ.get("ORCHESTRATR_TEST_ODBC_MARIADB", "MariaDB Unicode")
ODBC_PG_DRIVER = os.environ.get("ORCHESTRATR_TEST_ODBC_PG", "PostgreSQL Unicode")


def odbc_mysql_url(database: str, user: str = "root", password: str | None = None) -> str:
    """An ``mssql://`` URL that drives the aioodbc connector through MariaDB's
    ODBC driver with the MySQL dialect (OPTION=2: report rows matched)."""
    from urllib.parse import quote

    from orchestratr_sql.url import parse_url

    server = parse_url(f"{MYSQL_SERVER}/x")
    auth = quote(user) + (f":{quote(password)}" if password is not None else "")
    driver = quote(ODBC_MARIADB_DRIVER)
    return (
        f"mssql://{auth}@{server.host}:{server.port}/{database}"
        f"?driver={driver}&sql_dialect=mysql&OPTION=2"
    )


@pytest.fixture
async def odbc_storage(mysql_run_url: str) -> AsyncIterator[SqlStorage]:
    """An opened, emptied storage on the aioodbc connector (MariaDB ODBC driver)."""
    database = mysql_run_url.rsplit("/", 1)[1]
    storage = storage_from_url(odbc_mysql_url(database), pool_max=5)
    await storage.open()
    await wipe(storage)
    yield storage
    await storage.close()


STORAGE_FIXTURES = [
    pytest.param("sqlite_storage", id="sqlite"),
    pytest.param("pg_storage", id="postgresql", marks=pytest.mark.postgresql),
    pytest.param("mysql_storage", id="mariadb", marks=pytest.mark.mysql),
    pytest.param("odbc_storage", id="odbc-mariadb", marks=pytest.mark.mysql),
]


@pytest.fixture(params=STORAGE_FIXTURES)
def any_storage(request: pytest.FixtureRequest) -> SqlStorage:
    """An opened, empty storage of each dialect and driver (the fixtures above)."""
    storage = request.getfixturevalue(request.param)
    assert isinstance(storage, SqlStorage)
    return storage


DIALECT_PARAMS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
    pytest.param("mysql", id="mariadb", marks=pytest.mark.mysql),
    pytest.param("odbc", id="odbc-mariadb", marks=pytest.mark.mysql),
]
"""Every way of running the storage: the three dialects on their native
drivers, and the SQL Server plugin's aioodbc connector through MariaDB."""


@pytest.fixture(params=DIALECT_PARAMS)
async def store_url(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[str]:
    """The URL of a migrated, empty store of each kind (shared per run for the
    servers, emptied before the test; a fresh file for SQLite)."""
    kind = request.param
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path}/store.db"
    elif kind == "postgresql":
        url = request.getfixturevalue("pg_run_url")
    else:
        url = request.getfixturevalue("mysql_run_url")
        if kind == "odbc":
            url = odbc_mysql_url(url.rsplit("/", 1)[1])
    storage = storage_from_url(url)
    await storage.open()
    await wipe(storage)
    await storage.close()
    yield url


EMPTY_DB_PARAMS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
    pytest.param("mysql", id="mariadb", marks=pytest.mark.mysql),
]


@pytest.fixture(params=EMPTY_DB_PARAMS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    """The URL of an empty database (no tables): a new file, a new PostgreSQL
    schema, a new MariaDB database -- each dropped after the test."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/empty.db"
    if request.param == "postgresql":
        return pg_url(request.getfixturevalue("pg_schema"))
    return mysql_url(request.getfixturevalue("mysql_database"))
