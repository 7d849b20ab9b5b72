"""Clear one-line errors, credentials never shown, and recovery from a database
that drops our connections (an outage we can provoke cheaply)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable

import pytest

from orchestratr_core.errors import (
    BackendUnavailable,
    ConfigurationError,
    DataRejected,
    MissingDriver,
    PermanentBackendError,
)
from orchestratr_core.job import JobEvent, NewJob, new_id, utcnow
from orchestratr_core.plugin.manager import PluginManager
from orchestratr_core.protocol import ServerHeartbeat
from orchestratr_sql import SqlStorage, status
from orchestratr_sql.connection import Connection, Connector, ErrorKind
from orchestratr_sql.factory import make_connector
from orchestratr_sql.url import parse_url
from tests.support.sql import (
    MYSQL_SERVER,
    PG_DATABASE,
    PG_SERVER,
    mysql_admin,
    odbc_mysql_url,
    pg_admin,
    storage_from_url,
)

SECRET = "Sup3r-s3cret-pw"


def _with_password(server_url: str, password: str) -> str:
    scheme, rest = server_url.split("://", 1)
    userinfo, host = rest.rsplit("@", 1)
    return f"{scheme}://{userinfo.split(':', 1)[0]}:{password}@{host}"


def _assert_masked(error: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    text = f"{error} {error!r} {error.__cause__!r} {error.__context__!r}"
    assert SECRET not in text
    assert SECRET not in caplog.text
    assert "\n" not in str(error)


@pytest.mark.mysql
async def test_a_wrong_mariadb_password_is_a_permanent_masked_error(
    mysql_run_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    database = mysql_run_url.rsplit("/", 1)[1]
    storage = storage_from_url(f"{_with_password(MYSQL_SERVER, SECRET)}/{database}")
    with pytest.raises(PermanentBackendError) as info:
        await storage.open()
    assert "authentication failed" in str(info.value)
    assert ":***@" in str(info.value)
    _assert_masked(info.value, caplog)


@pytest.mark.mysql
async def test_a_wrong_password_through_odbc_is_a_permanent_masked_error(
    mysql_run_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    database = mysql_run_url.rsplit("/", 1)[1]
    storage = storage_from_url(odbc_mysql_url(database, password=SECRET))
    with pytest.raises(PermanentBackendError) as info:
        await storage.open()
    assert "authentication failed" in str(info.value)
    _assert_masked(info.value, caplog)


@pytest.mark.postgresql
async def test_an_unknown_postgres_database_is_a_permanent_masked_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"{_with_password(PG_SERVER, SECRET)}/orx_no_such_database"
    with pytest.raises(PermanentBackendError) as info:
        await storage_from_url(url).open()
    assert "database does not exist" in str(info.value)
    assert "orx_no_such_database" in str(info.value)
    _assert_masked(info.value, caplog)
    with pytest.raises(PermanentBackendError):
        await status(url)


@pytest.mark.mysql
async def test_an_unknown_database_through_odbc_is_a_permanent_error() -> None:
    with pytest.raises(PermanentBackendError) as info:
        await storage_from_url(odbc_mysql_url("orx_no_such_database")).open()
    assert "database does not exist" in str(info.value)


async def test_an_unreachable_host_is_unavailable_after_retries_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = (
        f"postgresql://someone:{SECRET}@127.0.0.1:9/db"
        "?retries=3&retry_initial=0.01&connect_timeout=2"
    )
    with pytest.raises(BackendUnavailable) as info:
        await storage_from_url(url).open()
    assert "unavailable" in str(info.value) and "3 attempts" in str(info.value)
    assert caplog.text.count("retrying") == 2
    _assert_masked(info.value, caplog)


def test_urls_and_options_are_validated_with_the_url_masked() -> None:
    with pytest.raises(ConfigurationError) as info:
        storage_from_url(f"postgresql://u:{SECRET}@h/db?pool_maxx=3")
    assert "pool_maxx" in str(info.value) and SECRET not in str(info.value)
    with pytest.raises(ConfigurationError):
        storage_from_url(f"mysql://u:{SECRET}@h")  # no database name
    with pytest.raises(ConfigurationError):
        storage_from_url("postgresql://h/db?schema=bad;name")
    assert SECRET not in repr(storage_from_url(f"postgresql://u:{SECRET}@h/db"))


async def _backend_ids(storage: SqlStorage, sql: str, count: int) -> set[int]:
    """The server-side ids of ``count`` pooled connections (held at once)."""
    ids: set[int] = set()
    gate = asyncio.Event()

    async def one() -> None:
        async with storage.connector.transaction(write=False) as conn:
            row = await conn.fetch_one(conn.adhoc("backend_id", sql), {})
            assert row is not None
            ids.add(int(next(iter(row.values()))))
            if len(ids) == count:
                gate.set()
            await asyncio.wait_for(gate.wait(), 10)

    await asyncio.gather(*(one() for _ in range(count)))
    return ids


async def _survives_killed_connections(
    storage: SqlStorage,
    kill: Callable[[int], Awaitable[None]],
    id_sql: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="orchestratr.storage.sql")
    now = utcnow()
    job = await storage.create_job(
        NewJob(id=new_id(), name=f"survivor-{new_id()}", argument="", created_at=now), "m", now
    )
    killed = await _backend_ids(storage, id_sql, 2)
    for backend in killed:
        await kill(backend)
    assert await storage.get_job(job.id) == job  # served by a fresh connection
    assert (await _backend_ids(storage, id_sql, 2)).isdisjoint(killed)


@pytest.mark.postgresql
async def test_postgres_connections_terminated_by_the_server_are_replaced_by_a_retry(
    pg_run_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    storage = storage_from_url(pg_run_url, pool_min=2, pool_max=2, retry_initial=0.01)
    await storage.open()
    try:

        async def kill(pid: int) -> None:
            await pg_admin(f"SELECT pg_terminate_backend({pid})")

        await _survives_killed_connections(storage, kill, "SELECT pg_backend_pid()", caplog)
    finally:
        await storage.close()


@pytest.mark.mysql
@pytest.mark.parametrize("via_odbc", [False, True], ids=["aiomysql", "odbc"])
async def test_mariadb_connections_killed_by_the_server_are_replaced_by_a_retry(
    mysql_run_url: str, caplog: pytest.LogCaptureFixture, via_odbc: bool
) -> None:
    url = odbc_mysql_url(mysql_run_url.rsplit("/", 1)[1]) if via_odbc else mysql_run_url
    storage = storage_from_url(url, pool_min=2, pool_max=2, retry_initial=0.01)
    await storage.open()
    try:

        async def kill(connection_id: int) -> None:
            await mysql_admin(f"KILL {connection_id}")

        await _survives_killed_connections(storage, kill, "SELECT CONNECTION_ID()", caplog)
    finally:
        await storage.close()


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_selecting_sqlite_by_url_imports_no_other_driver(tmp_path: object) -> None:
    result = _python(
        f"""
        import sys
        from orchestratr_core.plugin.manager import PluginManager
        storage = PluginManager().make_storage("sqlite:///{tmp_path}/x.db")
        print(type(storage).__name__)
        print(sorted(m for m in ("asyncpg", "aiomysql", "aioodbc", "pyodbc") if m in sys.modules))
        """
    )
    assert result.stdout.split() == ["SqlStorage", "[]"], result.stderr


def test_every_url_scheme_selects_its_plugin() -> None:
    manager = PluginManager()
    assert {
        scheme: manager.resolve(f"{scheme}://h/db").plugin
        for scheme in ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "mssql")
    } == {
        "sqlite": "sqlite",
        "postgresql": "postgresql",
        "postgres": "postgresql",
        "mysql": "mysql",
        "mariadb": "mysql",
        "mssql": "sqlserver",
    }
    storage = manager.make_storage(f"postgres://u:{SECRET}@127.0.0.1/{PG_DATABASE}")
    assert isinstance(storage, SqlStorage) and storage.dialect.name == "postgresql"


@pytest.mark.parametrize(
    ("url", "package", "extra"),
    [
        ("postgresql://h/db", "asyncpg", "orchestratr-sql[postgresql]"),
        ("mysql://h/db", "aiomysql", "orchestratr-sql[mysql]"),
        ("mssql://h/db", "aioodbc", "orchestratr-sql[sqlserver]"),
        ("sqlite:///x.db", "aiosqlite", "orchestratr-sql[sqlite]"),
    ],
)
def test_a_missing_driver_names_the_extra_to_install(url: str, package: str, extra: str) -> None:
    # A fresh interpreter where the driver cannot be imported.
    result = _python(
        f"""
        import sys
        sys.modules[{package!r}] = None
        from orchestratr_core.errors import MissingDriver
        from orchestratr_core.plugin.manager import PluginManager
        try:
            PluginManager().make_storage({url!r})
        except MissingDriver as exc:
            print(exc)
        """
    )
    assert extra in result.stdout, result.stderr
    assert MissingDriver.__name__  # the class the child process caught


SUICIDE = [
    pytest.param(
        "postgresql",
        "SELECT pg_terminate_backend(pg_backend_pid())",
        id="postgresql",
        marks=pytest.mark.postgresql,
    ),
    pytest.param("mysql", "KILL CONNECTION_ID()", id="mariadb", marks=pytest.mark.mysql),
    pytest.param("odbc", "KILL CONNECTION_ID()", id="odbc-mariadb", marks=pytest.mark.mysql),
]


@pytest.mark.parametrize(("kind", "suicide"), SUICIDE)
async def test_an_operation_whose_connection_dies_mid_transaction_is_retried_on_a_new_one(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture, kind: str, suicide: str
) -> None:
    caplog.set_level(logging.WARNING, logger="orchestratr.storage.sql")
    if kind == "postgresql":
        url = request.getfixturevalue("pg_run_url")
    else:
        url = request.getfixturevalue("mysql_run_url")
        if kind == "odbc":
            url = odbc_mysql_url(url.rsplit("/", 1)[1])
    storage = storage_from_url(url, pool_max=2, retry_initial=0.01)
    await storage.open()
    attempts = 0

    async def dies_once(conn: Connection) -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:  # the server kills this very connection
            await conn.run_script_statement(suicide)
            await conn.fetch(conn.adhoc("after", "SELECT 1 AS one"), {})
        return "done"

    try:
        assert await storage._run("test op", dies_once) == "done"
    finally:
        await storage.close()
    assert attempts == 2
    assert "test op on" in caplog.text and "retrying" in caplog.text


def test_a_connection_left_mid_protocol_by_a_restart_counts_as_unavailable() -> None:
    """Seen during a PostgreSQL restart: asyncpg raises InternalClientError on a
    connection the server dropped mid-operation; the storage must retry it."""
    import asyncpg

    from orchestratr_sql.connection import ErrorKind
    from orchestratr_sql.postgresql import PostgresConnector
    from orchestratr_sql.url import parse_url

    connector = PostgresConnector(parse_url("postgresql://postgres@127.0.0.1:5432/test"))
    error = asyncpg.InternalClientError(
        "cannot switch to state 15; another operation (2) is in progress"
    )
    assert connector.classify(error) is ErrorKind.UNAVAILABLE


# -- values a database refuses: DataRejected, never retried (issue 11) ------------------------


async def _job_row(storage: SqlStorage) -> str:
    now = utcnow()
    job = NewJob(id=new_id(), name=f"poison-{new_id()[-8:]}", argument="", created_at=now)
    await storage.create_job(job, "holder", now)
    return job.id


async def _refused(storage: SqlStorage, sql: str, **values: object) -> DataRejected:
    """Run one raw statement as a storage operation: it must be DataRejected at
    once (one attempt: no retry warning), whatever driver error the database gave."""

    async def run(conn: Connection) -> None:
        await conn.execute(conn.adhoc(f"poison {sql}", sql), values)

    with pytest.raises(DataRejected) as info:
        await storage._run("poison", run)
    assert "refused a value (poison)" in str(info.value)
    assert "\n" not in str(info.value)
    return info.value


async def test_driver_data_errors_are_data_rejected_on_every_dialect(
    any_storage: SqlStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """Each dialect's own error for a value out of range or against a check
    constraint: sqlite3 OverflowError / IntegrityError, asyncpg DataError
    (client-side) and 22003/23514, MariaDB 1264/4025, ODBC 22003/23000."""
    caplog.set_level(logging.WARNING, logger="orchestratr.storage.sql")
    job_id = await _job_row(any_storage)
    update = "UPDATE jobs SET {} WHERE id = :id"
    await _refused(any_storage, update.format("fence = :v"), v=2**63, id=job_id)
    await _refused(any_storage, update.format("fence = :v"), v=-1, id=job_id)  # CHECK
    if any_storage.dialect.name != "sqlite":  # SQLite integers are all 64-bit
        await _refused(any_storage, update.format("restarts = :v"), v=2**31, id=job_id)
        # Overflow computed by the server itself, not by the driver.
        await _refused(
            any_storage, update.format("restarts = restarts + :v + :v"), v=2**30, id=job_id
        )
    assert "retrying" not in caplog.text
    job = await any_storage.get_job(job_id)
    assert job is not None and (job.fence, job.restarts) == (0, 0)


@pytest.mark.postgresql
async def test_a_nul_in_an_error_text_is_data_rejected_on_postgresql(
    pg_storage: SqlStorage,
) -> None:
    """The storage call the manager used to make with a job's raw error (issue 11):
    PostgreSQL text cannot hold NUL (22021 invalid byte sequence)."""
    job_id = await _job_row(pg_storage)
    now = utcnow()
    await pg_storage.transition(job_id, JobEvent.START, server_id="s1", fence=5, now=now)
    with pytest.raises(DataRejected, match="0x00"):
        await pg_storage.transition(
            job_id, JobEvent.FAIL, server_id="s1", fence=5, now=now, error="bad \x00 byte"
        )
    job = await pg_storage.get_job(job_id)
    assert job is not None and job.last_error is None


async def test_a_lone_surrogate_is_data_rejected_on_sqlite(sqlite_storage: SqlStorage) -> None:
    """A string Python cannot encode as UTF-8 (UnicodeEncodeError) never reaches a database."""
    job_id = await _job_row(sqlite_storage)
    await _refused(
        sqlite_storage, "UPDATE jobs SET last_error = :v WHERE id = :id", v="\ud800", id=job_id
    )


@pytest.mark.mysql
async def test_an_over_long_server_name_is_data_rejected_on_mariadb(
    mysql_storage: SqlStorage,
) -> None:
    """MariaDB 1406 (data too long): a column narrower than what was sent."""
    heartbeat = ServerHeartbeat(
        server_id="s1", name="n" * 300, max_workers=1, started_at=1.0, sent_at=1.0
    )
    with pytest.raises(DataRejected, match=r"1406|too long"):
        await mysql_storage.apply_heartbeat(heartbeat, utcnow())
    assert await mysql_storage.get_server("s1") is None


def _sqlserver_connector() -> Connector:
    connector, _ = make_connector(parse_url("mssql://user@sqlserver.invalid/db"))
    return connector


# The errors a SQL Server ODBC driver raises (SQLSTATE, then the driver's text):
# no SQL Server can run here, so the classification is checked on pyodbc's classes.
_SQLSERVER_ERRORS = [
    ("DataError", "22003", "Arithmetic overflow converting expression to int. (8115)", "DATA"),
    ("DataError", "22001", "String or binary data would be truncated. (2628)", "DATA"),
    ("DataError", "22007", "Conversion failed when converting date and/or time. (241)", "DATA"),
    ("ProgrammingError", "22018", "Invalid character value for cast specification", "DATA"),
    ("IntegrityError", "23000", 'conflicted with the CHECK constraint "jobs_fence_check"', "DATA"),
    ("IntegrityError", "23000", "Cannot insert the value NULL into column 'name'. (515)", "DATA"),
    ("IntegrityError", "23000", "Cannot insert duplicate key row in object 'dbo.jobs'", "UNIQUE"),
    ("OperationalError", "08S01", "Communication link failure", "UNAVAILABLE"),
    ("OperationalError", "40001", "Transaction was deadlocked on lock resources", "TRANSIENT"),
    ("InterfaceError", "28000", "Login failed for user 'app'. (18456)", "AUTH"),
]  # fmt: skip


@pytest.mark.parametrize(("cls", "state", "text", "kind"), _SQLSERVER_ERRORS)
def test_sqlserver_errors_are_classified_from_pyodbc_exceptions(
    cls: str, state: str, text: str, kind: str
) -> None:
    import pyodbc

    error = getattr(pyodbc, cls)(state, f"[{state}] [Microsoft][ODBC Driver 18][SQL Server]{text}")
    assert _sqlserver_connector().classify(error) is ErrorKind[kind]


def test_python_conversion_errors_are_data_on_every_connector() -> None:
    """Raised while a driver converts a value, before the database sees it."""
    connectors = [
        _sqlserver_connector(),
        *(make_connector(parse_url(url))[0] for url in (
            "sqlite:///x.db", "postgresql://u@h/db", "mysql://u@h/db",
        )),
    ]  # fmt: skip
    for connector in connectors:
        for error in (
            OverflowError("Python int too large to convert to SQLite INTEGER"),
            UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
        ):
            assert connector.classify(error) is ErrorKind.DATA, (connector, error)
