"""``upgrade(url)`` and ``status(url)``: the schema of a database by URL, for
``orchestratr db upgrade|status`` and for deployment scripts."""

from __future__ import annotations

from orchestratr_sql.factory import make_connector
from orchestratr_sql.queries import migration_files
from orchestratr_sql.schema import applied_versions, guard, migrate
from orchestratr_sql.storage import SqlStorage
from orchestratr_sql.url import parse_url

__all__ = ["status", "upgrade"]


async def upgrade(url: str) -> list[str]:
    """Bring the database at ``url`` to the newest schema version; return the
    names of the versions applied (empty if it was up to date). Safe to run
    while managers are starting: migrations take a lock."""
    connector, dialect = make_connector(parse_url(url, {"migrate": False}))
    storage = SqlStorage(connector, dialect)
    await storage.open()
    try:
        applied: list[str] = await guard(connector, migrate(connector, dialect))
        return applied
    finally:
        await storage.close()


async def status(url: str) -> dict[str, object]:
    """The schema state of the database at ``url``: ``dialect``, ``url``
    (masked), ``current`` (newest applied version name or ``None``), ``latest``,
    ``applied`` and ``pending`` (version names), ``up_to_date``. Changes nothing."""
    connector, dialect = make_connector(parse_url(url, {"migrate": False}))
    storage = SqlStorage(connector, dialect)
    await storage.open()
    try:

        async def read() -> list[int]:
            async with connector.session() as conn:
                versions = await applied_versions(conn, connector, dialect)
                await connector.commit(conn)
                return versions

        versions = set(await guard(connector, read()))
    finally:
        await storage.close()
    names = {version: name for version, name, _ in migration_files(dialect.name)}
    applied = [names.get(v, f"{v:04d}_unknown") for v in sorted(versions)]
    pending = [name for version, name in sorted(names.items()) if version not in versions]
    return {
        "dialect": dialect.name,
        "url": connector.url.masked,
        "current": applied[-1] if applied else None,
        "latest": names[max(names)] if names else None,
        "applied": applied,
        "pending": pending,
        "up_to_date": not pending,
    }
