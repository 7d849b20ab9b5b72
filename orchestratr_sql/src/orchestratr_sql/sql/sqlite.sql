-- SQLite 3.33+ (UPDATE ... FROM, json_each). Lists travel as JSON arrays.

-- name: upsert_server
INSERT INTO servers (id, name, max_workers, host, pid, status, started_at, last_seen,
                     kinds, labels, updatable)
VALUES (:id, :name, :max_workers, :host, :pid, :status, :started_at, :now, :kinds, :labels,
        :updatable)
ON CONFLICT (id) DO UPDATE SET
    name = excluded.name, max_workers = excluded.max_workers, host = excluded.host,
    pid = excluded.pid, kinds = excluded.kinds, labels = excluded.labels,
    updatable = excluded.updatable,
    -- A requested drain (set_server_status) survives the next heartbeats.
    status = CASE WHEN servers.status = 'draining' THEN 'draining' ELSE excluded.status END, started_at = excluded.started_at,
    last_seen = excluded.last_seen;

-- name: heartbeat_start_jobs
-- Rows the report changes in nothing but a recent last_heartbeat are left alone
-- (see HEARTBEAT_REFRESH_STEP): "o" is the report's beat minus that step.
UPDATE jobs SET
    started_at = CASE WHEN jobs.server_id IS NULL OR jobs.server_id <> :server_id
                           OR jobs.fence <> b.fence
                      THEN :now ELSE jobs.started_at END,
    status = 'processing',
    server_id = :server_id,
    fence = b.fence,
    last_heartbeat = b.beat,
    restarts = b.restarts,
    updated_at = :now,
    reason = NULL
FROM (SELECT json_extract(value, '$.id') AS id, json_extract(value, '$.f') AS fence,
             json_extract(value, '$.h') AS beat, json_extract(value, '$.r') AS restarts,
             json_extract(value, '$.o') AS refresh_before
      FROM json_each(:batch)) AS b
WHERE jobs.id = b.id
  AND jobs.status IN ('pending', 'processing')
  AND (jobs.fence < b.fence
       OR (jobs.fence = b.fence AND (jobs.server_id IS NULL OR jobs.server_id = :server_id)))
  AND NOT (jobs.status = 'processing' AND jobs.server_id = :server_id AND jobs.fence = b.fence
           AND jobs.restarts = b.restarts AND jobs.reason IS NULL
           AND jobs.last_heartbeat IS NOT NULL AND jobs.last_heartbeat > b.refresh_before)
  -- A message of a generation an update in place superseded starts nowhere (only
  -- the owner's copy that took the update reports that fence again).
  AND (jobs.inplace_floor IS NULL
       OR b.fence - jobs.inplace_floor * 4294967296 >= 4294967296
       OR (jobs.fence = b.fence AND jobs.server_id = :server_id));

-- name: heartbeat_rejected_jobs
SELECT j.* FROM jobs AS j
JOIN (SELECT json_extract(value, '$.id') AS id, json_extract(value, '$.f') AS fence
      FROM json_each(:batch)) AS b ON j.id = b.id
WHERE NOT (j.status = 'processing' AND j.server_id = :server_id AND j.fence = b.fence)
ORDER BY j.id;

-- name: heartbeat_release_unreported
UPDATE jobs SET status = CASE WHEN status = 'processing' THEN 'pending' ELSE status END,
                server_id = NULL, updated_at = :now, reason = :reason
WHERE server_id = :server_id
  AND status IN ('processing', 'deleting')
  AND id NOT IN (SELECT value FROM json_each(:ids))
  AND (status <> 'processing' OR inplace_floor IS NULL OR inplace_floor < generation);

-- name: heartbeat_release_gone
-- A heartbeat that lists what changed (base set): release only the jobs it says are gone.
UPDATE jobs SET status = CASE WHEN status = 'processing' THEN 'pending' ELSE status END,
                server_id = NULL, updated_at = :now, reason = :reason
WHERE server_id = :server_id
  AND status IN ('processing', 'deleting')
  AND id IN (SELECT value FROM json_each(:gone))
  AND (status <> 'processing' OR inplace_floor IS NULL OR inplace_floor < generation);

-- name: select_jobs_by_ids
SELECT * FROM jobs WHERE id IN (SELECT value FROM json_each(:ids)) ORDER BY id;

-- name: select_running_jobs_of_servers
SELECT * FROM jobs
WHERE server_id IN (SELECT value FROM json_each(:ids)) AND status IN ('processing', 'deleting')
ORDER BY id;

-- name: claim_outbox
-- Writers are serialized by BEGIN IMMEDIATE, so no row locks are needed.
UPDATE outbox SET claimed_by = :holder, claimed_until = :until, claim_id = :claim_id
WHERE id IN (
    SELECT id FROM outbox
    WHERE claimed_until IS NULL OR claimed_until < :now
    ORDER BY id
    LIMIT :limit
);

-- name: delete_outbox
DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(:ids));

-- name: delete_outbox_for_jobs
DELETE FROM outbox
WHERE job_id IN (SELECT value FROM json_each(:ids)) AND kind = :kind AND claimed_by = :holder;

-- name: insert_outbox_for_jobs
-- The outbox rows of jobs just inserted by create_jobs' multi-row INSERT.
INSERT INTO outbox (job_id, kind, generation, created_at, claimed_by, claimed_until)
SELECT id, :kind, generation, created_at, :holder, :lease_until
FROM jobs WHERE id IN (SELECT value FROM json_each(:ids))
ORDER BY id;

-- name: select_active_names
-- Which of these names are taken (a batch insert failed on the unique index).
SELECT id, name FROM jobs
WHERE name IN (SELECT value FROM json_each(:names)) AND status <> 'deleted';

-- name: lease_insert
INSERT INTO leases (name, holder, lease_until) VALUES (:name, :holder, :until)
ON CONFLICT (name) DO NOTHING;

-- name: migrate_lock
-- The write lock of the database: a second manager waits (busy_timeout).
BEGIN IMMEDIATE;

-- name: migrate_unlock
COMMIT;

-- name: create_schema_version
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL
);
