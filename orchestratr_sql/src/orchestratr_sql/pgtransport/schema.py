"""The PostgreSQL transport's tables, their versioned migrations and its statements.

Tables live in the URL's schema (``public`` without one), each named
``<namespace>_<what>``, so that a storage and several fleets can share one schema.
Migrations are forward-only, applied under a transaction-level advisory lock and
recorded in ``<namespace>_version``; they never touch the storage's tables.

Claiming jobs is :func:`claim_sql` (a function in the database): the one place that
says which rows a server may take (the *pool predicate*). Since version 2 every job
row names its pool (:attr:`orchestratr_core.placement.Pool.key`: the kind and the
canonical constraints; ``default`` for the default pool, which every row written
before version 2 is in), ``<namespace>_pools`` registers every pool jobs were
published to, and a claim takes rows of one pool only.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from orchestratr_core.placement import DEFAULT_POOL, Pool

if TYPE_CHECKING:
    from orchestratr_sql.pgtransport.settings import PgTransportSettings

__all__ = [
    "CONSUMER_KEY",
    "DEAD_LETTER_LIMIT",
    "MIGRATION_KEY",
    "SERIAL_KEY",
    "claim_sql",
    "consumer_key",
    "migrate",
]

MIGRATION_KEY = -1
"""Second key of the transaction lock that serializes migrations."""
SERIAL_KEY = -2
"""Second key of the transaction lock that serializes command writes, so that
command ids commit in id order and a reader's cursor never skips one."""
EVENTS_KEY = 0
"""Second key of the session lock held by the one active events consumer."""
CONSUMER_KEY = -3
"""Second key of the *shared* session lock every job-consuming session holds: the
number of holders is the number of servers a claim shares the free rows with."""
DEAD_LETTER_LIMIT = 10_000
"""Most rows kept in ``<namespace>_dead`` (oldest dropped first)."""
_POOL_KEYS = 2**31 - 16
"""How many second keys the consumer locks of non-default pools spread over."""


def consumer_key(pool: Pool) -> int:
    """Second key of the shared session lock held by every session consuming ``pool``:
    :data:`CONSUMER_KEY` for the default pool, else a negative number from a digest
    of the pool's key (below -15, so that it is never a session number, which are
    positive, nor one of the keys above). Two pools whose keys share a digest only
    share their count of consumers (the fair share of a claim), nothing else."""
    if pool == DEFAULT_POOL:
        return CONSUMER_KEY
    digest = int.from_bytes(hashlib.sha256(pool.key.encode()).digest()[:4], "big")
    return -16 - digest % _POOL_KEYS


def _migrations(s: PgTransportSettings) -> list[list[str]]:
    t = s.table
    seq = t("sessions")
    return [
        [
            f"""CREATE TABLE IF NOT EXISTS {t("jobs")} (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                payload bytea NOT NULL,
                signature text,
                holder integer,
                deliveries integer NOT NULL DEFAULT 0,
                published_at timestamptz NOT NULL DEFAULT now())""",
            f'CREATE INDEX IF NOT EXISTS "{s.namespace}_jobs_holder" ON {t("jobs")} (holder)',
            f"""CREATE TABLE IF NOT EXISTS {t("events")} (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                payload bytea NOT NULL,
                signature text,
                published_at timestamptz NOT NULL DEFAULT now())""",
            f"""CREATE TABLE IF NOT EXISTS {t("commands")} (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                target text,
                payload bytea NOT NULL,
                signature text,
                published_at timestamptz NOT NULL DEFAULT now())""",
            f"""CREATE TABLE IF NOT EXISTS {t("cancellations")} (
                job_id text PRIMARY KEY)""",
            f"""CREATE TABLE IF NOT EXISTS {t("dead")} (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                queue text NOT NULL,
                payload bytea NOT NULL,
                reason text NOT NULL,
                dead_at timestamptz NOT NULL DEFAULT now())""",
            f"CREATE SEQUENCE IF NOT EXISTS {seq} AS integer MINVALUE 1 CYCLE",
            _claim_function(s, pooled=None),
        ],
        [
            # Pools: every row names its pool; rows already there are the default pool's.
            f"ALTER TABLE {t('jobs')} ADD COLUMN IF NOT EXISTS pool text NOT NULL "
            f"DEFAULT '{DEFAULT_POOL.key}'",
            f'CREATE INDEX IF NOT EXISTS "{s.namespace}_jobs_pool" ON {t("jobs")} (pool, id)',
            f"""CREATE TABLE IF NOT EXISTS {t("pools")} (
                key text PRIMARY KEY,
                registered_at timestamptz NOT NULL DEFAULT now())""",
            # A server of version 1 calls the claim without a pool: it takes the
            # default pool's rows only (it runs the default kind without labels).
            _claim_function(s, pooled=False),
            claim_sql(s),
        ],
    ]


async def migrate(conn: Any, s: PgTransportSettings) -> int:
    """Bring the transport's tables up to date on ``conn`` (asyncpg); returns the version."""
    steps = _migrations(s)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", s.lock_class, MIGRATION_KEY)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{s.schema}"')
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {s.table('version')} (version integer)")
        current = await conn.fetchval(f"SELECT max(version) FROM {s.table('version')}") or 0
        for number, statements in enumerate(steps, start=1):
            if number <= current:
                continue
            for statement in statements:
                await conn.execute(statement)
            await conn.execute(f"INSERT INTO {s.table('version')} VALUES ($1)", number)
    return len(steps)


def claim_sql(s: PgTransportSettings) -> str:
    """``CREATE FUNCTION <namespace>_claim(me, cls, n, consumer, want)``: see
    :func:`_claim_function`; ``want`` is the key of the pool to take rows of."""
    return _claim_function(s, pooled=True)


def _claim_function(s: PgTransportSettings, *, pooled: bool | None) -> str:
    """``CREATE FUNCTION <namespace>_claim(me, cls, n, consumer[, want])``: take jobs for session
    ``me`` in **one statement** -- one round trip, autocommitted, so a server cut off in
    the middle of a claim never leaves a transaction (and its row locks) open.

    *Pick* locks up to ``n`` free rows -- no more than a fair share: the free rows
    divided by the sessions consuming jobs (holders of the shared lock ``consumer``)
    -- ``SKIP LOCKED`` so that claiming servers never wait on each other. A row is
    free when nobody holds it or its holder's session lock is gone (the session
    ended: PostgreSQL released the lock with it); ``cls`` is the lock class as
    ``pg_locks`` shows it. *Take* reads the live sessions again *after* the rows are
    locked (each statement of the function reads ``pg_locks`` anew) -- a holder that
    claimed a row between the pick's look at ``pg_locks`` and its row lock took its
    session lock before claiming, so it is live by then -- and marks the rows held
    and counts the delivery, in the same transaction.

    Pool predicate: which pool a delivery comes from. ``pooled=True``: the rows of
    pool ``want`` (the function servers call since version 2, one consumer per
    pool, ``consumer`` being that pool's :func:`consumer_key`); ``False``: the
    default pool's (the four-argument function of version 1, kept for servers of
    version 1); ``None``: every row (version 1 as it was created; replaced by
    version 2).
    """
    jobs = s.table("jobs")
    live = (
        "SELECT l.objid::bigint FROM pg_locks l WHERE l.locktype = 'advisory' "
        "AND l.classid::bigint = cls AND l.objsubid = 2 AND l.granted"
    )
    consumers = (
        "SELECT count(DISTINCT l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' "
        "AND l.classid::bigint = cls AND l.objid::bigint = consumer AND l.objsubid = 2"
    )
    pool_predicate = {
        None: "TRUE",
        False: f"{{a}}.pool = '{DEFAULT_POOL.key}'",
        True: "{a}.pool = want",
    }[pooled]
    want = ", want text" if pooled else ""
    free = "({a}.holder IS NULL OR {a}.holder NOT IN (" + live + "))"
    return f"""
        CREATE OR REPLACE FUNCTION {s.table("claim")}(
            me integer, cls bigint, n integer, consumer bigint{want}
        )
        RETURNS TABLE (row_id bigint, row_payload bytea, row_signature text, row_count integer)
        LANGUAGE plpgsql AS $fn$
        DECLARE
            share integer;
            picked bigint[];
        BEGIN
            SELECT least(n, greatest(1, ceil(count(*)::numeric / greatest(1, ({consumers})))))
              INTO share
              FROM {jobs} f WHERE {free.format(a="f")} AND {pool_predicate.format(a="f")};
            SELECT array_agg(p.id) INTO picked FROM (
                SELECT c.id FROM {jobs} c
                WHERE {free.format(a="c")} AND {pool_predicate.format(a="c")}
                ORDER BY c.id
                LIMIT share
                FOR UPDATE SKIP LOCKED
            ) p;
            IF picked IS NULL THEN
                RETURN;
            END IF;
            RETURN QUERY
                UPDATE {jobs} j SET holder = me, deliveries = j.deliveries + 1
                WHERE j.id = ANY(picked) AND {free.format(a="j")}
                RETURNING j.id, j.payload, j.signature, j.deliveries - 1;
        END
        $fn$
    """
