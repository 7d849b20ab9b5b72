"""The PostgreSQL transport beyond the generic contract: self-fencing before PostgreSQL
gives a silent server's jobs away, loss and re-consumption when PostgreSQL ends the
session, one connection for hundreds of jobs, dead letters, signing, settings."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

import pytest

from orchestratr_core.errors import ConfigurationError, DeliveryLost
from orchestratr_core.plugin import get_plugin_manager
from orchestratr_core.protocol import CancelJob, Command, JobMessage, encode
from orchestratr_core.signing import Signer, SigningKey
from orchestratr_core.testing.proxy import SilentProxy
from orchestratr_core.testing.transport_suite import Collector
from orchestratr_core.transport import Delivery
from orchestratr_sql.pgtransport import PostgresTransport
from tests.pgtransport._support import admin
from tests.support.sql import PG_SERVER

pytestmark = pytest.mark.postgresql

Make = Callable[..., PostgresTransport]
FAST = {"heartbeat": 0.5, "fence_timeout": 1.5, "session_timeout": 3.0, "poll_interval": 1.0}


def _job(n: int) -> JobMessage:
    return JobMessage(f"job-{n}", f"name {n}", "", 1, 1_700_000_000.0)


async def _wait_until(check: Callable[[], bool], within: float) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic()


async def test_a_silent_partition_fences_the_server_before_postgresql_frees_its_jobs(
    make_pg_transport: Make, pgtransport_url: str
) -> None:
    proxy = SilentProxy(upstream_port=int(PG_SERVER.rsplit(":", 1)[1]))
    await proxy.start()
    try:
        behind = PostgresTransport(
            pgtransport_url.replace(PG_SERVER.rsplit(":", 1)[1], str(proxy.port), 1),
            namespace=make_pg_transport().settings.namespace,
            **FAST,
        )
        manager, other = make_pg_transport(**FAST), make_pg_transport(**FAST)
        for transport in (behind, manager, other):
            await transport.connect()
        mine: Collector[Delivery] = Collector(10)
        await behind.consume_jobs(5, mine)
        await manager.publish_job(_job(1))
        held = await mine.next()
        assert held.valid_until > time.monotonic()
        theirs: Collector[Delivery] = Collector(15)
        await other.consume_jobs(5, theirs)
        paused = time.monotonic()
        proxy.pause()
        lost_at = await _wait_until(held.lost.is_set, 5)
        assert lost_at - paused <= FAST["fence_timeout"] + 0.5
        assert held.valid_until <= lost_at
        taken = await theirs.next()
        taken_at = time.monotonic()
        assert taken.message == held.message
        assert taken.delivery_count > held.delivery_count
        # PostgreSQL gave it away only after the silent server had stopped it, and
        # not before the session timeout (measured from the last statement it got).
        assert taken_at > lost_at
        assert taken_at - paused >= FAST["session_timeout"] - FAST["heartbeat"]
        with pytest.raises(DeliveryLost):
            await held.ack()
        proxy.resume()
        await behind.close()
    finally:
        await proxy.stop()


async def test_a_session_ended_by_postgresql_loses_its_jobs_and_comes_back(
    make_pg_transport: Make,
) -> None:
    manager, server = make_pg_transport(**FAST), make_pg_transport(**FAST)
    await manager.connect()
    await server.connect()
    commands: Collector[Command] = Collector(10)
    _, snapshot = await server.consume_commands("s", commands)
    assert snapshot == frozenset()
    deliveries: Collector[Delivery] = Collector(10)
    await server.consume_jobs(3, deliveries)
    await manager.publish_job(_job(1))
    first = await deliveries.next()
    name = f"orchestratr-transport:{server.settings.namespace}"
    session = server._session
    assert session is not None
    await admin("SELECT pg_terminate_backend($1)", session.conn.get_server_pid())
    await _wait_until(first.lost.is_set, 5)
    # Cancelled while the server was away: reported before any new delivery.
    await manager.set_cancellations({"gone"})
    again = await deliveries.next()
    assert again.message == first.message
    assert again.delivery_count == first.delivery_count + 1
    assert CancelJob(job_id="gone") in commands.items
    assert len(await admin("SELECT 1 FROM pg_stat_activity WHERE application_name = $1", name))


async def test_hundreds_of_jobs_are_held_by_one_connection(make_pg_transport: Make) -> None:
    manager, server = make_pg_transport(), make_pg_transport()
    await manager.connect()
    await server.connect()
    deliveries: Collector[Delivery] = Collector(30)
    await server.consume_jobs(300, deliveries)
    for n in range(300):
        await manager.publish_job(_job(n))
    held = await deliveries.take(300)
    assert len({d.message.job_id for d in held}) == 300
    name = f"orchestratr-transport:{server.settings.namespace}"
    rows = await admin(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = $1", name
    )
    assert rows[0]["n"] == 2  # the manager's session and the server's: no connection per job
    locks = await admin(
        "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = $1",
        server.settings.lock_class & 0xFFFFFFFF,
    )
    # One lock per session, not per job; plus the consumer's shared "I take jobs" lock.
    assert locks[0]["n"] == 3


async def test_a_malformed_job_row_is_dead_lettered_with_its_reason(
    make_pg_transport: Make,
) -> None:
    manager, server = make_pg_transport(), make_pg_transport()
    await manager.connect()
    await server.connect()
    s = server.settings
    await admin(f"INSERT INTO {s.table('jobs')} (payload) VALUES ($1)", b"\xffnot json")
    deliveries: Collector[Delivery] = Collector(10)
    await server.consume_jobs(1, deliveries)
    await manager.publish_job(_job(1))
    assert (await deliveries.next()).message == _job(1)
    dead = await admin(f"SELECT queue, payload, reason FROM {s.table('dead')}")
    assert [(r["queue"], r["payload"]) for r in dead] == [("jobs", b"\xffnot json")]
    assert dead[0]["reason"]
    left = await admin(f"SELECT count(*) AS n FROM {s.table('jobs')}")
    assert left[0]["n"] == 1  # only the good one, held


async def test_with_a_fleet_key_unsigned_rows_are_refused(make_pg_transport: Make) -> None:
    signer = Signer(SigningKey(secrets.token_hex(32)))
    manager, server = make_pg_transport(signer=signer), make_pg_transport(signer=signer)
    await manager.connect()
    await server.connect()
    s = server.settings
    forged = encode(_job(666))
    await admin(f"INSERT INTO {s.table('jobs')} (payload) VALUES ($1)", forged)
    deliveries: Collector[Delivery] = Collector(10)
    await server.consume_jobs(5, deliveries)
    await manager.publish_job(_job(1))
    assert (await deliveries.next()).message == _job(1)
    await deliveries.quiet(0.5)
    dead = await admin(f"SELECT payload, reason FROM {s.table('dead')}")
    assert [r["payload"] for r in dead] == [forged]
    assert "unsigned" in dead[0]["reason"]


def test_the_plugin_is_chosen_by_url_and_by_name_and_hides_the_password() -> None:
    pm = get_plugin_manager()
    url = "postgresql://user:s3cret-pw@db.example:5432/app?schema=fleet&fence_timeout=2"
    transport = pm.make_transport(url)
    assert isinstance(transport, PostgresTransport)
    assert transport.settings.fence_timeout == 2.0
    assert transport.settings.schema == "fleet"
    assert "s3cret-pw" not in repr(transport)
    with pytest.raises(ConfigurationError, match="needs a URL"):
        pm.make_transport("postgresql")  # by name, without a URL: a clear error


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("fence_timeout=5&session_timeout=5", "session_timeout must exceed"),
        ("heartbeat=2&fence_timeout=3", "at least 2 x heartbeat"),
        ("namespace=a-b", "letters, digits"),
        ("bogus=1", "bogus"),
        ("claim_batch=0", "claim_batch"),
    ],
)
def test_bad_options_are_refused_clearly(query: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        PostgresTransport(f"postgresql://u:pw@h/db?{query}")


def test_a_url_of_another_database_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="postgresql://"):
        PostgresTransport("mysql://root@h/db")
