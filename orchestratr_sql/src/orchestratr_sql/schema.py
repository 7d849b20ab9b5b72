"""Versioned, forward-only schema migrations, one ``.sql`` file per version and
dialect (``migrations/<dialect>/NNNN_name.sql``), recorded in ``schema_version``.

Migrating takes a database-wide lock first (PostgreSQL advisory lock, MySQL
``GET_LOCK``, SQLite ``BEGIN IMMEDIATE``, SQL Server ``sp_getapplock``), so
several managers opening one empty database at once apply each version once.
``upgrade(url)`` and ``status(url)`` (:mod:`orchestratr_sql.admin`) serve
``orchestratr db upgrade|status``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from orchestratr_core.errors import BackendUnavailable, OrchestratrError
from orchestratr_sql.connection import Connection, Connector, ErrorKind
from orchestratr_sql.dialect import Dialect
from orchestratr_sql.errors import backend_error
from orchestratr_sql.queries import load_queries, migration_files, split_statements

__all__ = ["applied_versions", "guard", "latest_version", "migrate"]

log = logging.getLogger("orchestratr.storage.sql")


def latest_version(dialect: str) -> int:
    """The newest schema version this package ships for ``dialect``."""
    return len(migration_files(dialect))


def _lock_name(connector: Connector) -> str:
    url = connector.url
    return f"orchestratr_migrate:{url.options.schema or url.database or ''}"[:64]


async def applied_versions(conn: Connection, connector: Connector, dialect: Dialect) -> list[int]:
    """Versions recorded in ``schema_version`` (empty if the table is missing)."""
    queries = load_queries(dialect.name, connector.style)
    try:
        rows = await conn.fetch(queries["select_schema_versions"], {})
    except Exception as exc:
        kind = connector.classify(exc)
        if kind is not None and kind is not ErrorKind.UNIQUE:
            raise
        return []  # no schema_version table yet
    return [int(row["version"]) for row in rows]


async def migrate(
    connector: Connector, dialect: Dialect, *, target: int | None = None
) -> list[str]:
    """Apply every pending migration up to ``target`` (default: the latest),
    under the migration lock. Returns the names of the versions applied."""
    queries = load_queries(dialect.name, connector.style)
    scripts = migration_files(dialect.name)
    target = len(scripts) if target is None else target
    params: dict[str, Any] = {"lock_name": _lock_name(connector)}
    applied: list[str] = []
    async with connector.session() as conn:
        rows = await conn.fetch(queries["migrate_lock"], params)
        if rows and next(iter(rows[0].values())) in (0, None) and dialect.name == "mysql":
            raise BackendUnavailable(
                f"{connector.product} at {connector.url.masked}: timed out waiting for "
                "the migration lock held by another manager"
            )
        ok = False
        try:
            if dialect.name == "postgresql" and connector.url.options.schema:
                # Validated as a plain identifier in parse_url.
                await conn.run_script_statement(
                    f'CREATE SCHEMA IF NOT EXISTS "{connector.url.options.schema}"'
                )
            await conn.run_script_statement(queries["create_schema_version"].text)
            if not dialect.lock_in_transaction:
                await connector.commit(conn)
            done = set(await applied_versions(conn, connector, dialect))
            for version, name, script in scripts:
                if version in done or version > target:
                    continue
                log.info(
                    "applying migration %s to %s at %s",
                    name,
                    connector.product,
                    connector.url.masked,
                )
                if not dialect.lock_in_transaction:
                    await connector.begin(conn)
                try:
                    for statement in split_statements(script):
                        await conn.run_script_statement(statement)
                    await conn.execute(
                        queries["insert_schema_version"],
                        {"version": version, "name": name, "now": dialect.time_in(_now())},
                    )
                except BaseException:
                    if not dialect.lock_in_transaction:
                        await connector.rollback(conn)
                    raise
                if not dialect.lock_in_transaction:
                    await connector.commit(conn)
                applied.append(name)
            ok = True
        finally:
            if dialect.lock_in_transaction and not ok:
                await connector.rollback(conn)
            else:
                await conn.fetch(queries["migrate_unlock"], params)
                await connector.commit(conn)
    return applied


async def guard(connector: Connector, work: Any) -> Any:
    """Await ``work``, turning classified driver errors into OrchestratR errors
    (permanent or unavailable), with the URL masked."""
    try:
        return await work
    except OrchestratrError:
        raise
    except Exception as exc:
        kind = connector.classify(exc)
        if kind is None or kind is ErrorKind.UNIQUE:
            raise
        raise backend_error(connector, exc, kind, "migrate") from None


def _now() -> datetime:
    return datetime.now(UTC)
