-- PostgreSQL (asyncpg). Lists travel as arrays; heartbeats as parallel arrays
-- through unnest, so one statement updates any number of jobs.

-- name: upsert_server
INSERT INTO servers (id, name, max_workers, host, pid, status, started_at, last_seen)
VALUES (:id, :name, :max_workers, :host, :pid, :status, :started_at, :now)
ON CONFLICT (id) DO UPDATE SET
    name = excluded.name, max_workers = excluded.max_workers, host = excluded.host,
    pid = excluded.pid,
    -- A requested drain (set_server_status) survives the next heartbeats.
    status = CASE WHEN servers.status = 'draining' THEN 'draining' ELSE excluded.status END, started_at = excluded.started_at,
    last_seen = excluded.last_seen;

-- name: heartbeat_start_jobs
UPDATE jobs AS j SET
    started_at = CASE WHEN j.server_id IS NULL OR j.server_id <> :server_id OR j.fence <> b.fence
                      THEN :now ELSE j.started_at END,
    status = 'processing',
    server_id = :server_id,
    fence = b.fence,
    last_heartbeat = b.beat,
    restarts = b.restarts,
    updated_at = :now,
    reason = NULL
FROM unnest(:ids::text[], :fences::bigint[], :beats::timestamptz[], :restarts::int[])
     AS b(id, fence, beat, restarts)
WHERE j.id = b.id
  AND j.status IN ('pending', 'processing')
  AND (j.fence < b.fence OR (j.fence = b.fence AND (j.server_id IS NULL OR j.server_id = :server_id)));

-- name: heartbeat_rejected_jobs
SELECT j.* FROM jobs AS j
JOIN unnest(:ids::text[], :fences::bigint[]) AS b(id, fence) ON j.id = b.id
WHERE NOT (j.status = 'processing' AND j.server_id = :server_id AND j.fence = b.fence)
ORDER BY j.id;

-- name: heartbeat_release_unreported
UPDATE jobs SET status = CASE WHEN status = 'processing' THEN 'pending' ELSE status END,
                server_id = NULL, updated_at = :now, reason = :reason
WHERE server_id = :server_id
  AND status IN ('processing', 'deleting')
  AND NOT (id = ANY(:ids::text[]));

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
