"""Schema migrations: forward-only versions per dialect, applied under a lock,
from an empty database and from every earlier version; ``upgrade``/``status``."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from datetime import timedelta

import pytest

from orchestratr_core.errors import DuplicateJobName
from orchestratr_core.job import JobQuery, NewJob, new_id, utcnow
from orchestratr_sql import SqlStorage, status, storage_from_url, upgrade
from orchestratr_sql.connection import ErrorKind
from orchestratr_sql.queries import migration_files
from orchestratr_sql.schema import latest_version, migrate

ALL_VERSIONS = [name for _, name, _ in migration_files("sqlite")]
EARLIER_VERSIONS = list(range(1, latest_version("sqlite")))


async def test_upgrade_from_empty_applies_every_version_once(empty_db_url: str) -> None:
    before = await status(empty_db_url)
    assert before["current"] is None and before["pending"] == ALL_VERSIONS
    assert await upgrade(empty_db_url) == ALL_VERSIONS
    after = await status(empty_db_url)
    assert after["current"] == ALL_VERSIONS[-1]
    assert after["pending"] == [] and after["up_to_date"] is True
    assert await upgrade(empty_db_url) == []


@pytest.mark.parametrize("version", EARLIER_VERSIONS)
async def test_upgrade_from_an_earlier_version_keeps_the_data(
    empty_db_url: str, version: int
) -> None:
    storage = storage_from_url(empty_db_url, migrate=False)
    await storage.open()
    try:
        assert (
            await migrate(storage.connector, storage.dialect, target=version)
            == (ALL_VERSIONS[:version])
        )
        # Data as the code of that version wrote it (columns of 0001 only).
        now = utcnow()
        job_id = new_id()
        async with storage.connector.transaction() as conn:
            await conn.execute(
                conn.adhoc(
                    "old_insert",
                    "INSERT INTO jobs (id, name, argument, status, fence, generation,"
                    " created_at, updated_at, restarts)"
                    " VALUES (:id, 'survivor', '{}', 'pending', 0, 1, :now, :now, 0)",
                ),
                {"id": job_id, "now": storage.dialect.time_in(now)},
            )
    finally:
        await storage.close()
    state = await status(empty_db_url)
    assert state["current"] == ALL_VERSIONS[version - 1]
    assert state["pending"] == ALL_VERSIONS[version:]
    assert await upgrade(empty_db_url) == ALL_VERSIONS[version:]
    upgraded = storage_from_url(empty_db_url)
    await upgraded.open()
    try:
        job = await upgraded.get_job(job_id)
        assert job is not None and job.name == "survivor" and job.heartbeat_timeout is None
        assert abs(job.created_at - now) < timedelta(milliseconds=1)
        page = await upgraded.list_jobs(JobQuery(name_prefix="surv"), with_total=True)
        assert page.total == 1
        assert await upgraded.acquire_lease("l", "m", utcnow(), utcnow() + timedelta(seconds=5))
    finally:
        await upgraded.close()


async def test_managers_opening_one_empty_database_at_once_migrate_it_once(
    empty_db_url: str,
) -> None:
    storages = [storage_from_url(empty_db_url, pool_max=2) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in storages))
        state = await status(empty_db_url)
        assert state["applied"] == ALL_VERSIONS  # each version recorded exactly once
        now = utcnow()
        created = await asyncio.gather(
            *(
                s.create_job(
                    NewJob(id=new_id(), name=f"j{i}", argument="", created_at=now), "m", now
                )
                for i, s in enumerate(storages)
            )
        )
        assert len({job.id for job in created}) == 4
    finally:
        await asyncio.gather(*(s.close() for s in storages))


async def test_opening_with_migrate_false_changes_nothing(empty_db_url: str) -> None:
    storage = storage_from_url(empty_db_url, migrate=False)
    await storage.open()
    await storage.close()
    assert (await status(empty_db_url))["pending"] == ALL_VERSIONS


async def _refused(storage: SqlStorage, sql: str) -> BaseException:
    """Run ``sql``, which the database must refuse; the driver's error."""
    with pytest.raises(Exception) as caught:
        async with storage.connector.transaction() as conn:
            await conn.run_script_statement(sql)
    return caught.value


def _constraint_of(exc: BaseException) -> tuple[str, str] | None:
    """The constraint a driver error reports (``check``, ``foreign key`` or
    ``unique``, and what the driver names it by), ``None`` for any other error
    (a typo, a missing column). Per driver: PostgreSQL by SQLSTATE
    class and constraint name, MariaDB by error number and the name in its
    message, SQLite by its message (the expression of a CHECK, the columns of a
    UNIQUE, no name for a FOREIGN KEY)."""
    if isinstance(exc, sqlite3.IntegrityError):
        kind, _, name = str(exc).partition(" constraint failed")
        kinds = {"CHECK": "check", "FOREIGN KEY": "foreign key", "UNIQUE": "unique"}
        return (kinds[kind], name.removeprefix(": ")) if kind in kinds else None
    import aiomysql
    import asyncpg

    if isinstance(exc, asyncpg.PostgresError):
        pg_kinds = {"23514": "check", "23503": "foreign key", "23505": "unique"}
        pg_kind = pg_kinds.get(str(getattr(exc, "sqlstate", "")))
        return (pg_kind, str(getattr(exc, "constraint_name", ""))) if pg_kind else None
    if isinstance(exc, aiomysql.MySQLError) and exc.args:
        patterns = {
            4025: ("check", r"CONSTRAINT `(\w+)` failed"),
            1452: ("foreign key", r"CONSTRAINT `(\w+)` FOREIGN KEY"),
            1062: ("unique", r"for key '(\w+)'"),
        }
        if exc.args[0] not in patterns:
            return None
        kind, pattern = patterns[exc.args[0]]
        match = re.search(pattern, str(exc.args[1]))
        return (kind, match.group(1)) if match else None
    return None


# The constraints of the schema as each driver reports them (SQLite names none).
NAMED = {
    "check": "jobs_status_check",
    "foreign key": "outbox_job_fk",
    "unique": "jobs_active_name_uq",
}
SQLITE_NAMED = {
    "check": (
        "status IN ('pending', 'processing', 'deleting', 'deleted', 'completed', "
        "'pausing', 'paused', 'quarantined')"
    ),
    "foreign key": "",
    "unique": "jobs.name",
}


async def test_the_database_itself_rejects_bad_statuses_orphans_and_duplicate_names(
    empty_db_url: str,
) -> None:
    storage = storage_from_url(empty_db_url)
    await storage.open()
    try:
        now = utcnow()
        job = await storage.create_job(
            NewJob(id=new_id(), name="guarded", argument="", created_at=now), "m", now
        )
        named = SQLITE_NAMED if empty_db_url.startswith("sqlite") else NAMED
        bad_status = f"UPDATE jobs SET status = 'bogus' WHERE id = '{job.id}'"
        refused = await _refused(storage, bad_status)
        assert _constraint_of(refused) == ("check", named["check"]), refused
        # A value the database refuses is data, never retried (DataRejected).
        assert storage.connector.classify(refused) is ErrorKind.DATA
        orphan = (
            "INSERT INTO outbox (job_id, kind, generation, created_at) "
            f"VALUES ('no-such-job', 'publish', 1, '{now:%Y-%m-%d %H:%M:%S}')"
        )
        refused = await _refused(storage, orphan)
        assert _constraint_of(refused) == ("foreign key", named["foreign key"]), refused
        assert storage.connector.classify(refused) is ErrorKind.DATA
        duplicate = (
            "INSERT INTO jobs (id, name, argument, status, fence, generation, created_at,"
            f" updated_at, restarts) VALUES ('x-1', 'guarded', '', 'pending', 0, 1,"
            f" '{now:%Y-%m-%d %H:%M:%S}', '{now:%Y-%m-%d %H:%M:%S}', 0)"
        )
        refused = await _refused(storage, duplicate)
        assert _constraint_of(refused) == ("unique", named["unique"]), refused
        # The error the storage turns into the core's DuplicateJobName.
        assert storage.connector.classify(refused) is ErrorKind.UNIQUE
        with pytest.raises(DuplicateJobName):
            await storage.create_job(
                NewJob(id=new_id(), name="guarded", argument="", created_at=now), "m", now
            )
    finally:
        await storage.close()
