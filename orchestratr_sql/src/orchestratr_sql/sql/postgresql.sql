-- PostgreSQL (asyncpg). Lists travel as arrays; heartbeats as parallel arrays
-- through unnest, so one statement updates any number of jobs.

-- name: create_job
-- The job and its outbox row in ONE statement (data-modifying CTEs): atomic by
-- itself, so it runs without BEGIN/COMMIT -- one round trip. A taken name fails
-- the whole statement with a unique violation; the foreign key of the outbox
-- row is checked at the end of the statement, when the job row exists.
WITH j AS (
    INSERT INTO jobs (id, name, argument, status, server_id, fence, generation,
                      created_at, updated_at, restarts, heartbeat_timeout, kind, requires, spread)
    VALUES (:id, :name, :argument, 'pending', NULL, 0, :generation, :now, :now, 0,
            :heartbeat_timeout, :job_kind, :requires, :spread)
    RETURNING *
), o AS (
    INSERT INTO outbox (job_id, kind, generation, created_at, claimed_by, claimed_until)
    SELECT j.id, :kind::varchar, j.generation, j.created_at, :holder::varchar,
           :lease_until::timestamptz
    FROM j
)
SELECT * FROM j;

-- name: create_jobs
-- Many jobs and their outbox rows in one statement: parallel arrays through
-- unnest (one parameter each, whatever the number of jobs). Outbox rows are
-- numbered in the order of the arrays.
WITH b AS (
    SELECT * FROM unnest(:ids::text[], :names::text[], :arguments::text[],
                         :generations::bigint[], :created::timestamptz[],
                         :timeouts::float8[], :kinds::text[], :requires::text[],
                         :spreads::text[])
        WITH ORDINALITY AS b(id, name, argument, generation, created_at, heartbeat_timeout,
                             kind, requires, spread, n)
), j AS (
    INSERT INTO jobs (id, name, argument, status, server_id, fence, generation,
                      created_at, updated_at, restarts, heartbeat_timeout, kind, requires, spread)
    SELECT b.id, b.name, b.argument, 'pending', NULL, 0, b.generation,
           b.created_at, b.created_at, 0, b.heartbeat_timeout, b.kind, b.requires, b.spread
    FROM b ORDER BY b.n
    RETURNING *
), o AS (
    INSERT INTO outbox (job_id, kind, generation, created_at, claimed_by, claimed_until)
    SELECT j.id, :kind::varchar, j.generation, j.created_at, :holder::varchar,
           :lease_until::timestamptz
    FROM j JOIN b ON b.id = j.id
    ORDER BY b.n
)
SELECT * FROM j;

-- name: upsert_servers
-- The server rows of many heartbeats that list no job, in one statement: one row
-- per server id (the caller keeps the latest of each); heartbeat_starts writes the
-- row of one heartbeat that lists jobs.
INSERT INTO servers (id, name, max_workers, host, pid, status, started_at, last_seen,
                     kinds, labels, updatable)
SELECT * FROM unnest(:ids::text[], :names::text[], :max_workers::int[], :hosts::text[],
                     :pids::int[], :statuses::text[], :started::timestamptz[],
                     :seen::timestamptz[], :kinds::text[], :labels::text[],
                     :updatables::text[])
ON CONFLICT (id) DO UPDATE SET
    name = excluded.name, max_workers = excluded.max_workers, host = excluded.host,
    pid = excluded.pid, kinds = excluded.kinds, labels = excluded.labels,
    updatable = excluded.updatable,
    status = CASE WHEN servers.status = 'draining' THEN 'draining' ELSE excluded.status END, started_at = excluded.started_at,
    last_seen = excluded.last_seen;

-- name: heartbeat_starts
-- The part of a heartbeat that lists jobs, in ONE statement: upsert the server
-- row, apply START to every reported job, return the reports that did not apply
-- ('r') and the jobs of :read as they were before ('b': the jobs whose start
-- reports the heartbeat carries; read_and_apply_heartbeat). Atomic by itself: a
-- heartbeat of what changed that names no job gone runs as this one statement,
-- one round trip without BEGIN/COMMIT; one that releases jobs runs it in the
-- transaction of its releases. Every part reads the statement's snapshot: a
-- reported row the update left alone is as it was, and rejected unless it is
-- processing here under this fence already; a row it updated is accepted. The
-- foreign key of jobs.server_id is checked at the end of the statement, when the
-- server row exists. (A retry after a commit whose answer was lost reads :read
-- as the first attempt left it: the manager then tells an old owner to stop its
-- copy at that owner's next heartbeat, as a conflict, instead of at once.)
-- Rows the report changes in nothing but a recent last_heartbeat are left alone
-- (no write, no WAL): see HEARTBEAT_REFRESH_STEP (:refresh_step). A message of a
-- generation an update in place superseded starts nowhere (only the owner's copy
-- that took the update reports that fence again).
WITH s AS (
    INSERT INTO servers (id, name, max_workers, host, pid, status, started_at, last_seen,
                         kinds, labels, updatable)
    VALUES (:id, :name, :max_workers, :host, :pid, :status, :started_at, :now, :kinds,
            :labels, :updatable)
    ON CONFLICT (id) DO UPDATE SET
        name = excluded.name, max_workers = excluded.max_workers, host = excluded.host,
        pid = excluded.pid, kinds = excluded.kinds, labels = excluded.labels,
        updatable = excluded.updatable,
        -- A requested drain (set_server_status) survives the next heartbeats.
        status = CASE WHEN servers.status = 'draining' THEN 'draining' ELSE excluded.status END, started_at = excluded.started_at,
        last_seen = excluded.last_seen
), b AS (
    SELECT * FROM unnest(:ids::text[], :fences::bigint[], :beats::timestamptz[],
                         :restarts::int[]) AS b(id, fence, beat, restarts)
), u AS (
    UPDATE jobs AS j SET
        started_at = CASE WHEN j.server_id IS NULL OR j.server_id <> :server_id
                               OR j.fence <> b.fence
                          THEN :now ELSE j.started_at END,
        status = 'processing',
        server_id = :server_id,
        fence = b.fence,
        last_heartbeat = b.beat,
        restarts = b.restarts,
        updated_at = :now,
        reason = NULL
    FROM b
    WHERE j.id = b.id
      AND j.status IN ('pending', 'processing')
      AND (j.fence < b.fence
           OR (j.fence = b.fence AND (j.server_id IS NULL OR j.server_id = :server_id)))
      AND NOT (j.status = 'processing' AND j.server_id = :server_id AND j.fence = b.fence
               AND j.restarts = b.restarts AND j.reason IS NULL
               AND j.last_heartbeat IS NOT NULL
               AND j.last_heartbeat > b.beat - :refresh_step::interval)
      AND (j.inplace_floor IS NULL
           OR b.fence - j.inplace_floor * 4294967296 >= 4294967296
           OR (j.fence = b.fence AND j.server_id = :server_id))
    RETURNING j.id
)
SELECT 'b' AS part, j.* FROM jobs AS j WHERE j.id = ANY(:read::text[])
UNION ALL
SELECT 'r' AS part, j.* FROM jobs AS j JOIN b ON j.id = b.id
WHERE NOT EXISTS (SELECT 1 FROM u WHERE u.id = j.id)
  AND NOT (j.status = 'processing' AND j.server_id = :server_id AND j.fence = b.fence);

-- name: heartbeat_release_unreported
UPDATE jobs SET status = CASE WHEN status = 'processing' THEN 'pending' ELSE status END,
                server_id = NULL, updated_at = :now, reason = :reason
WHERE server_id = :server_id
  AND status IN ('processing', 'deleting')
  AND NOT (id = ANY(:ids::text[]))
  AND (status <> 'processing' OR inplace_floor IS NULL OR inplace_floor < generation);

-- name: heartbeat_release_gone
-- A heartbeat that lists what changed (base set): release only the jobs it says are gone.
UPDATE jobs SET status = CASE WHEN status = 'processing' THEN 'pending' ELSE status END,
                server_id = NULL, updated_at = :now, reason = :reason
WHERE server_id = :server_id
  AND status IN ('processing', 'deleting')
  AND id = ANY(:gone::text[])
  AND (status <> 'processing' OR inplace_floor IS NULL OR inplace_floor < generation);

-- name: select_jobs_by_ids
SELECT * FROM jobs WHERE id = ANY(:ids::text[]) ORDER BY id;

-- name: select_running_jobs_of_servers
SELECT * FROM jobs
WHERE server_id = ANY(:ids::text[]) AND status IN ('processing', 'deleting')
ORDER BY id;

-- name: claim_outbox
-- SKIP LOCKED: a concurrent manager claims other rows instead of waiting.
UPDATE outbox SET claimed_by = :holder, claimed_until = :until, claim_id = :claim_id
WHERE id IN (
    SELECT id FROM outbox
    WHERE claimed_until IS NULL OR claimed_until < :now
    ORDER BY id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
);

-- name: delete_outbox
DELETE FROM outbox WHERE id = ANY(:ids::bigint[]);

-- name: delete_outbox_for_jobs
DELETE FROM outbox WHERE job_id = ANY(:ids::text[]) AND kind = :kind AND claimed_by = :holder;

-- name: insert_outbox_for_jobs
-- The outbox rows of jobs just inserted (other dialects; create_jobs does both here).
INSERT INTO outbox (job_id, kind, generation, created_at, claimed_by, claimed_until)
SELECT id, :kind::varchar, generation, created_at, :holder::varchar, :lease_until::timestamptz
FROM jobs WHERE id = ANY(:ids::text[])
ORDER BY id;

-- name: select_active_names
-- Which of these names are taken (a batch insert failed on the unique index).
SELECT id, name FROM jobs WHERE name = ANY(:names::text[]) AND status <> 'deleted';

-- name: lease_insert
INSERT INTO leases (name, holder, lease_until) VALUES (:name, :holder, :until)
ON CONFLICT (name) DO NOTHING;

-- name: migrate_lock
-- Session-level advisory lock, one per schema (lock_name names it): managers opening one empty
-- database at once migrate one after the other.
SELECT pg_advisory_lock(hashtext(:lock_name));

-- name: migrate_unlock
SELECT pg_advisory_unlock(hashtext(:lock_name));

-- name: create_schema_version
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    name VARCHAR(200) NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL
);

-- name: record_failures
-- record_failure (common.sql) for many jobs in one statement (parallel arrays),
-- each row its own compare-and-set on failure_seq; the ids that applied.
UPDATE jobs AS j SET
    reason = CASE WHEN f.quarantine IS NOT NULL AND j.status IN ('pending', 'processing')
                  THEN f.quarantine ELSE j.reason END,
    status = CASE WHEN f.quarantine IS NOT NULL AND j.status IN ('pending', 'processing')
                  THEN 'quarantined' ELSE j.status END,
    failure_seq = j.failure_seq + 1,
    failure_log = f.failure_log,
    updated_at = :now
FROM unnest(:ids::text[], :seqs::int[], :logs::text[], :quarantines::text[])
     AS f(id, seq, failure_log, quarantine)
WHERE j.id = f.id AND j.failure_seq = f.seq AND j.status NOT IN ('deleted', 'completed')
RETURNING j.id;
