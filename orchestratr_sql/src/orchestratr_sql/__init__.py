"""OrchestratR storage on SQL databases: SQLite, PostgreSQL, MySQL/MariaDB, SQL Server.

Importing this package imports no database driver: each plugin module
(:mod:`orchestratr_sql.sqlite`, :mod:`~orchestratr_sql.postgresql`,
:mod:`~orchestratr_sql.mysql`, :mod:`~orchestratr_sql.sqlserver`) imports its
own driver when a storage is built.
"""

from __future__ import annotations

from orchestratr_sql.admin import status, upgrade
from orchestratr_sql.factory import storage_from_url
from orchestratr_sql.storage import SqlStorage

__all__ = ["SqlStorage", "status", "storage_from_url", "upgrade"]
