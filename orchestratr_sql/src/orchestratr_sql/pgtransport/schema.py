"""The PostgreSQL transport's tables, their versioned migrations and its statements.

Tables live in the URL's schema (``public`` without one), each named
``<namespace>_<what>``, so that a storage and several fleets can share one schema.
Migrations are forward-only, applied under a transaction-level advisory lock and
recorded in ``<namespace>_version``; they never touch the storage's tables.

Claiming jobs is :func:`claim_sql`: the one place that says which rows a server may
take (the *pool predicate*). Job kinds and placement constraints add their filter
there, and only there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestratr_sql.pgtransport.settings import PgTransportSettings

__all__ = [
    "CONSUMER_KEY",
    "DEAD_LETTER_LIMIT",
    "MIGRATION_KEY",
    "SERIAL_KEY",
    "claim_sql",
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
"""Second key of the session lock held by the one active events consumer."""
DEAD_LETTER_LIMIT = 10_000
"""Most rows kept in ``<namespace>_dead`` (oldest dropped first)."""


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


def claim_sql(s: PgTransportSettings) -> tuple[str, str]:
    """The two statements, run in one transaction, that take jobs for a session.

    *Pick* (``$1`` lock class as ``pg_locks`` shows it, ``$2`` how many at most, ``$3``
    the consumer key as ``pg_locks`` shows it) locks up to ``$2`` free rows -- no more
    than a fair share: the free rows divided by the sessions consuming jobs --
    ``SKIP LOCKED`` so that claiming servers never wait on each
    other. A row is free when nobody holds it or its holder's session lock is gone
    (the session ended: PostgreSQL released the lock with it). *Take* (``$1`` this
    session's number, ``$2`` the lock class, ``$3`` the picked ids) reads the live
    sessions again *after* the rows are locked -- a holder that claimed a row
    between the pick's look at ``pg_locks`` and its row lock is live by then -- and
    marks the rows held and counts the delivery, in the same transaction.

    Pool predicate: which pool a delivery comes from. Today every server takes from
    the one pool; kinds and placement constraints become one more condition in
    ``pool_predicate`` (with their parameters), and only there.
    """
    jobs = s.table("jobs")
    live = (
        "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' "
        "AND classid::bigint = {cls} AND objsubid = 2 AND granted"
    )
    pool_predicate = "TRUE"
    free = "({a}.holder IS NULL OR {a}.holder NOT IN (" + live.format(cls="$1") + "))"
    consumers = (
        "SELECT count(DISTINCT l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' "
        "AND l.classid::bigint = $1 AND l.objid::bigint = $3 AND l.objsubid = 2"
    )
    # A fair share: the free rows over the consuming servers, so that the first server
    # woken does not take everything (RabbitMQ hands messages round-robin).
    share = (
        f"least($2, greatest(1, ceil((SELECT count(*) FROM {jobs} f WHERE "
        f"{free.format(a='f')} AND {pool_predicate})::numeric "
        f"/ greatest(1, ({consumers})))))::integer"
    )
    pick = f"""
        SELECT c.id FROM {jobs} c
        WHERE {free.format(a="c")}
          AND {pool_predicate}
        ORDER BY c.id
        LIMIT {share}
        FOR UPDATE SKIP LOCKED
    """
    take = f"""
        UPDATE {jobs} j SET holder = $1, deliveries = j.deliveries + 1
        WHERE j.id = ANY($3::bigint[])
          AND (j.holder IS NULL OR j.holder NOT IN ({live.format(cls="$2")}))
        RETURNING j.id, j.payload, j.signature, j.deliveries - 1 AS count
    """
    return pick, take
