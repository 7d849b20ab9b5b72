-- MySQL 8 / MariaDB 10.6+. Lists travel as JSON arrays read with JSON_TABLE.
-- The connector asks for "found rows" (CLIENT_FOUND_ROWS), so affected-row
-- counts are rows matched, as in the other dialects.

-- name: upsert_server
INSERT INTO servers (id, name, max_workers, host, pid, status, started_at, last_seen,
                     kinds, labels, updatable)
VALUES (:id, :name, :max_workers, :host, :pid, :status, :started_at, :now, :kinds, :labels,
        :updatable)
ON DUPLICATE KEY UPDATE
    name = VALUES(name), max_workers = VALUES(max_workers), host = VALUES(host),
    pid = VALUES(pid), kinds = VALUES(kinds), labels = VALUES(labels),
    updatable = VALUES(updatable),
    -- A requested drain (set_server_status) survives the next heartbeats.
    status = IF(status = 'draining', 'draining', VALUES(status)), started_at = VALUES(started_at),
    last_seen = VALUES(last_seen);

-- name: heartbeat_start_jobs
-- Rows the report changes in nothing but a recent last_heartbeat are left alone
-- (see HEARTBEAT_REFRESH_STEP): "o" is the report's beat minus that step.
UPDATE jobs AS j
JOIN JSON_TABLE(:batch, '$[*]' COLUMNS (
        id VARCHAR(36) PATH '$.id',
        fence BIGINT PATH '$.f',
        beat DATETIME(6) PATH '$.h',
        restarts INT PATH '$.r',
        refresh_before DATETIME(6) PATH '$.o')) AS b
  ON j.id = b.id
SET j.started_at = CASE WHEN j.server_id IS NULL OR j.server_id <> :server_id OR j.fence <> b.fence
                        THEN :now ELSE j.started_at END,
    j.status = 'processing',
    j.server_id = :server_id,
    j.fence = b.fence,
    j.last_heartbeat = b.beat,
    j.restarts = b.restarts,
    j.updated_at = :now,
    j.reason = NULL
WHERE j.status IN ('pending', 'processing')
  AND (j.fence < b.fence OR (j.fence = b.fence AND (j.server_id IS NULL OR j.server_id = :server_id)))
  AND NOT (j.status = 'processing' AND j.server_id = :server_id AND j.fence = b.fence
           AND j.restarts = b.restarts AND j.reason IS NULL
           AND j.last_heartbeat IS NOT NULL AND j.last_heartbeat > b.refresh_before)
  -- A message of a generation an update in place superseded starts nowhere (only
  -- the owner's copy that took the update reports that fence again).
  AND (j.inplace_floor IS NULL
       OR b.fence - j.inplace_floor * 4294967296 >= 4294967296
       OR (j.fence = b.fence AND j.server_id = :server_id));

-- name: heartbeat_rejected_jobs
SELECT j.* FROM jobs AS j
JOIN JSON_TABLE(:batch, '$[*]' COLUMNS (id VARCHAR(36) PATH '$.id', fence BIGINT PATH '$.f')) AS b
  ON j.id = b.id
WHERE NOT (j.status = 'processing' AND j.server_id = :server_id AND j.fence = b.fence)
ORDER BY j.id;

-- name: heartbeat_release_unreported
UPDATE jobs SET status = CASE WHEN status = 'processing' THEN 'pending' ELSE status END,
                server_id = NULL, updated_at = :now, reason = :reason
WHERE server_id = :server_id
  AND status IN ('processing', 'deleting')
  AND id NOT IN (SELECT t.id FROM JSON_TABLE(:ids, '$[*]' COLUMNS (id VARCHAR(36) PATH '$')) AS t)
  AND (status <> 'processing' OR inplace_floor IS NULL OR inplace_floor < generation);

-- name: heartbeat_release_gone
-- A heartbeat that lists what changed (base set): release only the jobs it says are gone.
UPDATE jobs SET status = CASE WHEN status = 'processing' THEN 'pending' ELSE status END,
                server_id = NULL, updated_at = :now, reason = :reason
WHERE server_id = :server_id
  AND status IN ('processing', 'deleting')
  AND id IN (SELECT t.id FROM JSON_TABLE(:gone, '$[*]' COLUMNS (id VARCHAR(36) PATH '$')) AS t)
  AND (status <> 'processing' OR inplace_floor IS NULL OR inplace_floor < generation);

-- name: select_jobs_by_ids
SELECT j.* FROM jobs AS j
JOIN JSON_TABLE(:ids, '$[*]' COLUMNS (id VARCHAR(36) PATH '$')) AS t ON j.id = t.id
ORDER BY j.id;

-- name: select_running_jobs_of_servers
SELECT j.* FROM jobs AS j
JOIN JSON_TABLE(:ids, '$[*]' COLUMNS (id VARCHAR(255) PATH '$')) AS t ON j.server_id = t.id
WHERE j.status IN ('processing', 'deleting')
ORDER BY j.id;

-- name: claim_outbox
-- UPDATE locks the rows it claims; a concurrent claimer re-reads them after
-- our commit and finds them claimed.
UPDATE outbox SET claimed_by = :holder, claimed_until = :until, claim_id = :claim_id
WHERE claimed_until IS NULL OR claimed_until < :now
ORDER BY id
LIMIT :limit;

-- name: delete_outbox
DELETE FROM outbox
WHERE id IN (SELECT t.id FROM JSON_TABLE(:ids, '$[*]' COLUMNS (id BIGINT PATH '$')) AS t);

-- name: delete_outbox_for_jobs
DELETE FROM outbox
WHERE job_id IN (SELECT t.id FROM JSON_TABLE(:ids, '$[*]' COLUMNS (id VARCHAR(36) PATH '$')) AS t)
  AND kind = :kind AND claimed_by = :holder;

-- name: insert_outbox_for_jobs
-- The outbox rows of jobs just inserted by create_jobs' multi-row INSERT.
INSERT INTO outbox (job_id, kind, generation, created_at, claimed_by, claimed_until)
SELECT j.id, :kind, j.generation, j.created_at, :holder, :lease_until
FROM jobs AS j
JOIN JSON_TABLE(:ids, '$[*]' COLUMNS (id VARCHAR(36) PATH '$')) AS t ON j.id = t.id
ORDER BY j.id;

-- name: select_active_names
-- Which of these names are taken (a batch insert failed on the unique index);
-- the storage compares the names exactly itself.
SELECT j.id, j.name FROM jobs AS j
JOIN JSON_TABLE(:names, '$[*]' COLUMNS (name VARCHAR(200) PATH '$')) AS t ON j.name = t.name
WHERE j.status <> 'deleted';

-- name: lease_insert
-- Two managers racing past NOT EXISTS: the loser gets a duplicate key error,
-- which the storage reports as "not acquired".
INSERT INTO leases (name, holder, lease_until)
SELECT :name, :holder, :until FROM DUAL
WHERE NOT EXISTS (SELECT 1 FROM leases WHERE name = :name);

-- name: migrate_lock
SELECT GET_LOCK(:lock_name, 60) AS locked;

-- name: migrate_unlock
SELECT RELEASE_LOCK(:lock_name) AS released;

-- name: create_schema_version
CREATE TABLE IF NOT EXISTS schema_version (
    version INT NOT NULL PRIMARY KEY,
    name VARCHAR(200) NOT NULL,
    applied_at DATETIME(6) NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
