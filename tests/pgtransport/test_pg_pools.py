"""Pools (job kinds and placement constraints) on the PostgreSQL transport, beyond the
generic contract: the upgrade of a version-1 namespace (its rows are the default
pool's, a version-1 server still takes them and only them), a NOTIFY that wakes the
consumers of the pools that got rows and no other, one shared lock per pool consumed."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from orchestratr_core.placement import DEFAULT_POOL, Pool
from orchestratr_core.protocol import JobMessage, encode
from orchestratr_core.testing.transport_suite import Collector
from orchestratr_core.transport import Delivery
from orchestratr_sql.pgtransport import PostgresTransport
from orchestratr_sql.pgtransport.schema import CONSUMER_KEY, _migrations, consumer_key
from tests.pgtransport._support import admin

pytestmark = pytest.mark.postgresql

Make = Callable[..., PostgresTransport]


def _job(n: int, pool: Pool = DEFAULT_POOL) -> JobMessage:
    message = JobMessage(f"job-{n}", f"name {n}", "", 1, 1_700_000_000.0)
    return dataclasses.replace(message, kind=pool.kind, constraints=pool.constraints)


async def test_a_version_1_namespace_is_upgraded_its_rows_are_the_default_pools(
    make_pg_transport: Make,
) -> None:
    server = make_pg_transport()
    s = server.settings
    # The namespace as version 1 left it, with a row in it.
    await admin(f'CREATE SCHEMA IF NOT EXISTS "{s.schema}"')
    await admin(f"CREATE TABLE {s.table('version')} (version integer)")
    for statement in _migrations(s)[0]:
        await admin(statement)
    await admin(f"INSERT INTO {s.table('version')} VALUES (1)")
    await admin(f"INSERT INTO {s.table('jobs')} (payload) VALUES ($1)", encode(_job(1)))

    await server.connect()  # migrates to version 2
    versions = await admin(f"SELECT max(version) AS v FROM {s.table('version')}")
    assert versions[0]["v"] == 2
    rows = await admin(f"SELECT pool FROM {s.table('jobs')}")
    assert [r["pool"] for r in rows] == [DEFAULT_POOL.key]
    # A server of version 1 (the four-argument claim) takes default-pool rows only.
    feed = Pool.of("feed")
    await server.publish_job(_job(2, feed))
    cls = s.lock_class & 0xFFFFFFFF
    old = await admin(
        f"SELECT row_id FROM {s.table('claim')}(1, $1, 10, $2)", cls, CONSUMER_KEY & 0xFFFFFFFF
    )
    assert len(old) == 1
    await admin(f"UPDATE {s.table('jobs')} SET holder = NULL")
    # This version: each pool through its own consumer.
    default: Collector[Delivery] = Collector(10)
    feeds: Collector[Delivery] = Collector(10)
    await server.consume_jobs(5, default)
    await server.consume_pool(feed, 5, feeds)
    assert (await default.next()).message.job_id == "job-1"
    assert (await feeds.next()).message.job_id == "job-2"
    await default.quiet(0.3)
    await feeds.quiet(0.3)


async def test_a_job_wakes_the_consumers_of_its_own_pool_only(make_pg_transport: Make) -> None:
    manager, server = make_pg_transport(), make_pg_transport()
    await manager.connect()
    await server.connect()
    pools = [Pool.of(f"k{n}") for n in range(8)]
    collectors = [Collector[Delivery](10) for _ in pools]
    for pool, collector in zip(pools, collectors, strict=True):
        await server.consume_pool(pool, 50, collector)
    # Past the first claim of each consumer and the session's first ping (which
    # wakes every consumer: it has no earlier set of live sessions to compare with).
    await asyncio.sleep(server.settings.heartbeat * 1.5)
    claims: dict[str, int] = {}
    real_claim = server._claim

    async def counting(sub: Any) -> bool:
        claims[sub.pool.key] = claims.get(sub.pool.key, 0) + 1
        return await real_claim(sub)

    server._claim = counting  # type: ignore[method-assign]
    for n in range(20):
        await manager.publish_job(_job(n, pools[0]))
    await collectors[0].take(20)
    await collectors[0].quiet(0.3)
    assert claims.get(pools[0].key, 0) >= 1
    # The other seven pools' consumers were not woken (the safety poll is 5 s away).
    assert {k: v for k, v in claims.items() if k != pools[0].key} == {}


async def test_each_pool_consumed_holds_one_shared_lock_given_up_on_close(
    make_pg_transport: Make,
) -> None:
    server = make_pg_transport()
    await server.connect()
    s = server.settings
    feed, eu = Pool.of("feed"), Pool.of("feed", ["region=eu"])
    consumers = [
        await server.consume_jobs(1, Collector[Delivery](1)),
        await server.consume_pool(feed, 1, Collector[Delivery](1)),
        await server.consume_pool(eu, 1, Collector[Delivery](1)),
    ]
    keys = {consumer_key(p) & 0xFFFFFFFF for p in (DEFAULT_POOL, feed, eu)}
    assert len(keys) == 3
    assert all(consumer_key(p) < -15 for p in (feed, eu))
    sql = (
        "SELECT objid::bigint AS k FROM pg_locks WHERE locktype = 'advisory' "
        "AND classid::bigint = $1 AND objsubid = 2 AND objid::bigint = ANY($2::bigint[])"
    )
    cls = s.lock_class & 0xFFFFFFFF
    assert {r["k"] for r in await admin(sql, cls, list(keys))} == keys
    await consumers[1].close()
    left = {r["k"] for r in await admin(sql, cls, list(keys))}
    assert left == keys - {consumer_key(feed) & 0xFFFFFFFF}


async def test_the_safety_poll_is_one_statement_and_wakes_the_pool_with_a_free_row(
    make_pg_transport: Make,
) -> None:
    server = make_pg_transport(poll_interval=1.0)
    await server.connect()
    s = server.settings
    pools = [Pool.of(f"k{n}") for n in range(6)]
    collectors = [Collector[Delivery](10) for _ in pools]
    for pool, collector in zip(pools, collectors, strict=True):
        await server.consume_pool(pool, 5, collector)
    await asyncio.sleep(s.heartbeat * 1.5)
    claims: list[str] = []
    real_claim = server._claim

    async def counting(sub: Any) -> bool:
        claims.append(sub.pool.key)
        return await real_claim(sub)

    server._claim = counting  # type: ignore[method-assign]
    # A row whose NOTIFY was missed (none sent): the safety poll finds it.
    await admin(
        f"INSERT INTO {s.table('jobs')} (payload, pool) VALUES ($1, $2)",
        encode(_job(7, pools[3])),
        pools[3].key,
    )
    got = await collectors[3].next()
    assert got.message.job_id == "job-7"
    assert set(claims) == {pools[3].key}


async def test_after_postgresql_ends_the_session_pools_are_named_again_and_consumed(
    make_pg_transport: Make,
) -> None:
    fast = {"heartbeat": 0.5, "fence_timeout": 1.5, "session_timeout": 3.0}
    manager, server = make_pg_transport(**fast), make_pg_transport(**fast)
    await manager.connect()
    await server.connect()
    feed = Pool.of("feed", ["region=eu"])
    await manager.publish_job(_job(1, feed))
    heard: Collector[Pool] = Collector(10)
    await server.watch_pools(heard)
    assert set(await heard.take(2)) == {DEFAULT_POOL, feed}
    deliveries: Collector[Delivery] = Collector(10)
    await server.consume_pool(feed, 5, deliveries)
    first = await deliveries.next()
    session = server._session
    assert session is not None
    await admin("SELECT pg_terminate_backend($1)", session.conn.get_server_pid())
    assert await _lost(first)
    # The new session names every pool again, and the pool's consumer claims again.
    assert set(await heard.take(2)) == {DEFAULT_POOL, feed}
    again = await deliveries.next()
    assert again.message == first.message
    assert again.delivery_count == first.delivery_count + 1
    late = Pool.of("late")
    await manager.publish_job(_job(2, late))
    assert await heard.next() == late


async def _lost(delivery: Delivery) -> bool:
    for _ in range(250):
        if delivery.lost.is_set():
            return True
        await asyncio.sleep(0.02)
    return False
