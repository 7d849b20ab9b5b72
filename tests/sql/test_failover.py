"""The PostgreSQL storage on a primary and a synchronous standby
(``.ci/infra postgres-ha``): a multi-host URL, and a failover that is a
transient fault -- every acknowledged write survives it, every operation is
applied whole or not at all, and the storage follows the promoted node."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import asyncpg
import pytest

from orchestratr_core.display import mask_url
from orchestratr_core.errors import BackendUnavailable, ConfigurationError
from orchestratr_core.job import JobStatus, NewJob, new_id, utcnow
from orchestratr_sql import SqlStorage
from orchestratr_sql.url import parse_url
from tests.support.pgha import PostgresHA, infra_async
from tests.support.sql import storage_from_url

pytestmark = [pytest.mark.postgresql, pytest.mark.cluster]

HOLDER = "failover-test"


# -- the URL --------------------------------------------------------------------------------


def test_a_url_naming_two_hosts_targets_the_one_that_accepts_writes() -> None:
    url = parse_url("postgresql://u:pw@db1:5433,db2/orchestratr?schema=s")
    assert url.hosts == (("db1", 5433), ("db2", 5432))
    assert (url.host, url.port) == ("db1", 5433)
    assert url.options.target_session_attrs == "read-write"
    assert parse_url("postgresql://u@db1/x").options.target_session_attrs is None
    chosen = parse_url("postgresql://u@db1,db2/x?target_session_attrs=primary")
    assert chosen.options.target_session_attrs == "primary"


def test_a_multi_host_url_is_shown_with_its_hosts_and_without_its_password() -> None:
    shown = mask_url("postgresql://u:s3cret@db1:5432,db2:5432/x?target_session_attrs=read-write")
    assert shown == "postgresql://u:***@db1:5432,db2:5432/x?target_session_attrs=read-write"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://u@db1,db2/x?target_session_attrs=standby", "accepts writes"),
        ("postgresql://u@db1,db2/x?target_session_attrs=read-only", "accepts writes"),
        ("mysql://u@db1,db2/x", "only PostgreSQL"),
        ("mysql://u@db1/x?target_session_attrs=any", "PostgreSQL only"),
        ("postgresql://u:s3cret@db1:5432,db2:port/x", "invalid database URL"),
    ],
)
def test_a_url_the_storage_cannot_write_through_is_refused_clearly(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says) as caught:
        parse_url(url)
    assert "s3cret" not in str(caught.value)


# -- the failover ---------------------------------------------------------------------------


async def _server_port(storage: SqlStorage) -> int:
    async with storage.connector.transaction(write=False) as conn:
        row = await conn.fetch_one(conn.adhoc("port", "SELECT inet_server_port() AS port"), {})
    assert row is not None
    return int(row["port"])


async def _facts(url: str) -> tuple[dict[str, str], set[tuple[str, str]]]:
    """Straight from the primary: job id -> status, and (job id, outbox kind)."""
    server, schema = url.split("&schema=", 1)
    conn = await asyncpg.connect(server)
    try:
        jobs = await conn.fetch(f'SELECT id, status FROM "{schema}".jobs')
        outbox = await conn.fetch(f'SELECT job_id, kind FROM "{schema}".outbox')
    finally:
        await conn.close()
    return (
        {str(r["id"]): str(r["status"]) for r in jobs},
        {(str(r["job_id"]), str(r["kind"])) for r in outbox},
    )


def _new(name: str) -> NewJob:
    return NewJob(id=new_id(), name=name, argument=name, created_at=utcnow())


async def test_creates_and_cancels_through_a_failover_are_kept_whole_or_not_at_all(
    postgres_ha: PostgresHA, ha_schema: str
) -> None:
    """A burst of creates and cancels while the primary is killed and the standby
    promoted: each acknowledged one is on the new primary; each that failed
    failed with BackendUnavailable and left all of itself or nothing (a job row
    exactly with its publish row; a deleting status exactly with its cancel row)."""
    storage = storage_from_url(ha_schema, retries=3, retry_initial=0.05, retry_max=0.2)
    await storage.open()
    before = await _server_port(storage)
    created: list[str] = []
    cancelled: list[str] = []
    unknown: list[str] = []
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def burst(worker: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            job = _new(f"w{worker}-{i}")
            lease = utcnow() + timedelta(seconds=30)
            try:
                await storage.create_job(job, HOLDER, lease)
                created.append(job.id)
            except BackendUnavailable as exc:
                errors.append(exc)
                unknown.append(job.id)
                await asyncio.sleep(0.05)
                continue
            if i % 2 == 0:
                try:
                    await storage.request_cancel(job.id, utcnow(), HOLDER, lease)
                    cancelled.append(job.id)
                except BackendUnavailable as exc:
                    errors.append(exc)
                    await asyncio.sleep(0.05)

    workers = [asyncio.create_task(burst(w)) for w in range(4)]
    await asyncio.sleep(1.0)
    await infra_async("failover")
    failed_over = len(created)
    await asyncio.sleep(1.5)
    stop.set()
    await asyncio.gather(*workers)
    after = await _server_port(storage)
    await storage.close()

    assert after != before, "the storage did not follow the promotion"
    assert len(created) > failed_over, "no create succeeded after the failover"
    for exc in errors:
        assert "unavailable" in str(exc).lower(), exc
    jobs, outbox = await _facts(ha_schema)
    lost = [j for j in created if j not in jobs]
    assert not lost, f"{len(lost)} acknowledged create(s) lost in the failover"
    not_cancelled = [j for j in cancelled if jobs[j] != JobStatus.DELETING.value]
    assert not not_cancelled, f"acknowledged cancels lost: {not_cancelled[:5]}"
    for job_id, status in jobs.items():
        assert (job_id, "publish") in outbox, f"job {job_id} without its publish row"
        cancelling = status == JobStatus.DELETING.value
        assert cancelling == ((job_id, "cancel") in outbox), f"half a cancel of {job_id}"
    half = [(j, k) for j, k in outbox if j not in jobs]
    assert not half, f"outbox rows of jobs that do not exist: {half[:5]}"
    print(
        f"{len(created)} creates, {len(cancelled)} cancels acknowledged; "
        f"{len(errors)} BackendUnavailable ({len([j for j in unknown if j in jobs])} of "
        f"{len(unknown)} unacknowledged creates were applied whole)"
    )


async def test_a_write_while_no_node_accepts_writes_fails_transiently_then_succeeds(
    postgres_ha: PostgresHA, ha_schema: str
) -> None:
    """Primary killed, standby not yet promoted: a create fails with a clear
    BackendUnavailable and leaves nothing; once the standby is promoted the same
    create succeeds on it, with no reconfiguration."""
    storage = storage_from_url(ha_schema, retries=2, retry_initial=0.05, retry_max=0.1)
    await storage.open()
    try:
        await infra_async("kill-primary")
        job = _new("during")
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable) as caught:
            await storage.create_job(job, HOLDER, utcnow() + timedelta(seconds=30))
        assert time.monotonic() - t0 < 15
        text = str(caught.value)
        assert "PostgreSQL" in text and "2 attempts" in text and "\n" not in text
        await infra_async("promote")
        record = await storage.create_job(job, HOLDER, utcnow() + timedelta(seconds=30))
        assert record.id == job.id
        assert await storage.get_job(job.id) is not None
    finally:
        await storage.close()
    jobs, outbox = await _facts(ha_schema)
    assert set(jobs) == {job.id}
    assert outbox == {(job.id, "publish")}


async def test_a_transaction_cut_off_midway_frees_its_locks_after_the_idle_timeout(
    pg_schema: str,
) -> None:
    """A manager cut off from the database between two statements of a transaction
    (a silent partition: nothing closes) must not hold its row locks until TCP
    gives up: the server ends the session after ``idle_in_transaction_timeout``."""
    from orchestratr_core.testing.proxy import SilentProxy
    from orchestratr_sql.postgresql import PostgresConnector
    from tests.support.sql import PG_DATABASE, PG_SERVER, pg_url

    proxy = SilentProxy(upstream_port=parse_url(f"{PG_SERVER}/x").port or 5432)
    await proxy.start()
    direct = storage_from_url(pg_url(pg_schema))
    await direct.open()
    user = PG_SERVER.split("://", 1)[1].rsplit("@", 1)[0]
    cut_url = parse_url(
        f"postgresql://{user}@127.0.0.1:{proxy.port}/{PG_DATABASE}?schema={pg_schema}",
        {"idle_in_transaction_timeout": 1.0},
    )
    # One connection with exactly the settings the storage's pool uses.
    raw = await asyncpg.connect(**PostgresConnector(cut_url)._connect_args())
    job = _new("locked")
    await direct.create_job(job, HOLDER, utcnow())
    lock = "UPDATE jobs SET argument = 'x' WHERE id = :id"
    try:
        await raw.execute("BEGIN")
        await raw.execute("UPDATE jobs SET argument = 'y' WHERE id = $1", job.id)
        proxy.pause()  # cut off with the row locked, the COMMIT never sent
        t0 = time.monotonic()
        async with direct.connector.transaction() as other:
            await other.execute(other.adhoc("lock", lock), {"id": job.id})
        waited = time.monotonic() - t0
    finally:
        raw.terminate()
        proxy.resume()
        await proxy.stop()
        await direct.close()
    assert 0.5 < waited < 10, waited
