"""Fixtures of the SQL storage tests. They live in ``sql_helpers`` so that test
modules can import its helpers under a unique module name."""

from __future__ import annotations

from sql_helpers import (
    any_storage,
    empty_db_url,
    mysql_database,
    mysql_run_url,
    mysql_storage,
    odbc_storage,
    pg_run_url,
    pg_schema,
    pg_storage,
    sqlite_storage,
    store_url,
)

__all__ = [
    "any_storage",
    "empty_db_url",
    "mysql_database",
    "mysql_run_url",
    "mysql_storage",
    "odbc_storage",
    "pg_run_url",
    "pg_schema",
    "pg_storage",
    "sqlite_storage",
    "store_url",
]
