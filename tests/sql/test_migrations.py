"""Schema migrations: forward-only versions per dialect, applied under a lock,
from an empty database and from every earlier version; ``upgrade``/``status``."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

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


async def _rejects(storage: SqlStorage, sql: str) -> bool:
    try:
        async with storage.connector.transaction() as conn:
            await conn.run_script_statement(sql)
    except Exception as exc:  # the database's own constraint error (a refused value)
        return storage.connector.classify(exc) in (ErrorKind.DATA, ErrorKind.UNIQUE)
    return False


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
        assert await _rejects(storage, f"UPDATE jobs SET status = 'bogus' WHERE id = '{job.id}'")
        assert await _rejects(
            storage,
            "INSERT INTO outbox (job_id, kind, generation, created_at) "
            f"VALUES ('no-such-job', 'publish', 1, '{now:%Y-%m-%d %H:%M:%S}')",
        )
        assert await _rejects(
            storage,
            "INSERT INTO jobs (id, name, argument, status, fence, generation, created_at,"
            f" updated_at, restarts) VALUES ('x-1', 'guarded', '', 'pending', 0, 1,"
            f" '{now:%Y-%m-%d %H:%M:%S}', '{now:%Y-%m-%d %H:%M:%S}', 0)",
        )
    finally:
        await storage.close()
