"""SQL Server: no server can run here, so every T-SQL statement we ship is parsed
as T-SQL (sqlglot), and the ODBC connection string is checked as text."""

from __future__ import annotations

import pytest
import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError

from orchestratr_core.job import JobQuery, JobStatus
from orchestratr_sql.dialect import get_dialect
from orchestratr_sql.queries import (
    load_queries,
    migration_files,
    raw_queries,
    split_statements,
    values_query,
)
from orchestratr_sql.sqlserver import connection_string
from orchestratr_sql.storage import job_listing_sql
from orchestratr_sql.url import DIALECTS, parse_url

TSQL_QUERIES = sorted(load_queries("sqlserver", "qmark").items())
TSQL_MIGRATIONS = [
    (f"{name}#{index}", statement)
    for _, name, script in migration_files("sqlserver")
    for index, statement in enumerate(split_statements(script))
]
LISTINGS = [
    JobQuery(),
    JobQuery(limit=None),
    JobQuery(limit=None, offset=30),
    JobQuery(statuses=frozenset({JobStatus.PENDING, JobStatus.PROCESSING}), limit=10),
    JobQuery(name_prefix="feed-", server_id="s1", after="0190", offset=5, include_deleted=True),
]


def parse_tsql(sql: str) -> None:
    """Parse as T-SQL; fail on a parse error and on sqlglot's "Command" fallback
    (text it kept without understanding)."""
    parsed = sqlglot.parse(sql, read="tsql", error_level=sqlglot.ErrorLevel.RAISE)
    assert parsed and all(statement is not None for statement in parsed)
    fallbacks = [s for s in parsed if isinstance(s, exp.Command)]
    assert not fallbacks, f"sqlglot did not understand: {fallbacks}"


@pytest.mark.parametrize(("name", "query"), TSQL_QUERIES, ids=[n for n, _ in TSQL_QUERIES])
def test_every_named_tsql_query_parses_as_tsql(name: str, query: object) -> None:
    parse_tsql(query.text)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("where", "statement"), TSQL_MIGRATIONS, ids=[w for w, _ in TSQL_MIGRATIONS]
)
def test_every_tsql_migration_statement_parses_as_tsql(where: str, statement: str) -> None:
    parse_tsql(statement)


@pytest.mark.parametrize("query", LISTINGS, ids=range(len(LISTINGS)))
def test_monitor_listing_sql_parses_as_tsql(query: JobQuery) -> None:
    listing = job_listing_sql(get_dialect("sqlserver"), query)
    assert listing is not None
    page_sql, count_sql, _ = listing
    parse_tsql(page_sql.replace(":", "@"))  # named params as T-SQL variables
    parse_tsql(count_sql.replace(":", "@"))


@pytest.mark.parametrize("rows", [1, 3, 200])
def test_the_multi_row_insert_of_create_jobs_parses_as_tsql(rows: int) -> None:
    query = values_query("sqlserver", "insert_job", rows, "qmark")
    assert query.text.count("?") == 10 * rows <= 2100  # SQL Server's parameter limit
    assert rows <= get_dialect("sqlserver").insert_rows
    parse_tsql(query.text)


def test_the_tsql_parse_check_rejects_broken_sql() -> None:
    # Proves the checks above can fail: sqlglot raises on malformed T-SQL.
    with pytest.raises(ParseError):
        parse_tsql("SELECT * FROM (jobs WHERE")
    with pytest.raises(ParseError):
        parse_tsql("INSERT INTO jobs (id VALUES (?)")
    with pytest.raises(ParseError):
        parse_tsql("UPDATE jobs SET status = 'x' WHERE (")


ONE_STATEMENT_CREATES = {"create_job", "create_jobs"}
"""PostgreSQL only: a job and its outbox row in one statement (data-modifying
CTEs); the other dialects run insert_job and the outbox inserts in a transaction."""


POSTGRESQL_BATCHES = {"upsert_servers", "record_failures"}
"""Queries only PostgreSQL has (parallel arrays); the others loop in one transaction."""


ONE_STATEMENT_HEARTBEATS = {"heartbeat_starts"}
"""PostgreSQL only: a heartbeat's server row, starts and refused reports (and the
jobs read before it) in one statement, in place of the three below."""
REPLACED_ON_POSTGRESQL = {"upsert_server", "heartbeat_start_jobs", "heartbeat_rejected_jobs"}


def test_every_dialect_defines_the_same_named_queries() -> None:
    only_pg = ONE_STATEMENT_CREATES | POSTGRESQL_BATCHES | ONE_STATEMENT_HEARTBEATS
    optional = only_pg | REPLACED_ON_POSTGRESQL
    names = {dialect: set(raw_queries(dialect)) - optional for dialect in DIALECTS}
    assert all(found == names["sqlite"] for found in names.values()), names
    assert set(raw_queries("postgresql")) >= only_pg
    assert not REPLACED_ON_POSTGRESQL & set(raw_queries("postgresql"))
    assert not ONE_STATEMENT_CREATES & set(raw_queries("sqlserver"))
    others = [d for d in DIALECTS if d != "postgresql"]
    assert not any(
        (POSTGRESQL_BATCHES | ONE_STATEMENT_HEARTBEATS) & set(raw_queries(d)) for d in others
    )
    assert all(set(raw_queries(d)) >= REPLACED_ON_POSTGRESQL for d in others)


def test_every_dialect_ships_the_same_migration_versions() -> None:
    versions = {d: [(v, n) for v, n, _ in migration_files(d)] for d in DIALECTS}
    assert all(found == versions["sqlite"] for found in versions.values()), versions


def test_sql_server_connection_string_uses_host_comma_port_and_quotes_the_password() -> None:
    url = parse_url(
        "mssql://sa:p%3Bss%7Dword@db.example:14330/orch"
        "?driver=ODBC+Driver+18+for+SQL+Server&TrustServerCertificate=yes&pool_max=3"
    )
    text = connection_string(url)
    assert text == (
        "DRIVER={ODBC Driver 18 for SQL Server};SERVER=db.example,14330;DATABASE=orch;"
        "UID=sa;PWD={p;ss}}word};TrustServerCertificate=yes"
    )
    assert url.options.pool_max == 3
    assert "p;ss}word" not in repr(url) and "p%3Bss" not in url.masked


def test_other_odbc_drivers_get_a_separate_port_keyword() -> None:
    url = parse_url("mssql://root@127.0.0.1:3306/db?driver=MariaDB+Unicode&OPTION=2")
    assert connection_string(url) == (
        "DRIVER={MariaDB Unicode};SERVER=127.0.0.1;PORT=3306;DATABASE=db;UID=root;OPTION=2"
    )


def test_mssql_url_defaults_to_the_microsoft_odbc_driver_18() -> None:
    url = parse_url("mssql://sa:pw@host/db")
    assert url.driver == "ODBC Driver 18 for SQL Server" and url.port == 1433
