-- SQL Server 2016+ (T-SQL) through aioodbc. Lists travel as JSON arrays read
-- with OPENJSON. NOT VERIFIED against a real SQL Server: these statements are
-- parsed as T-SQL by the tests (sqlglot), and the aioodbc connector they run
-- on is tested against MariaDB through its ODBC driver.

-- name: upsert_server
MERGE INTO servers WITH (HOLDLOCK) AS s
USING (SELECT :id AS id) AS v ON s.id = v.id
WHEN MATCHED THEN UPDATE SET
    name = :name, max_workers = :max_workers, host = :host, pid = :pid,
    kinds = :kinds, labels = :labels, updatable = :updatable,
    -- A requested drain (set_server_status) survives the next heartbeats.
    status = CASE WHEN s.status = 'draining' THEN 'draining' ELSE :status END,
    started_at = :started_at, last_seen = :now
WHEN NOT MATCHED THEN
    INSERT (id, name, max_workers, host, pid, status, started_at, last_seen, kinds, labels,
            updatable)
    VALUES (:id, :name, :max_workers, :host, :pid, :status, :started_at, :now, :kinds, :labels,
            :updatable);

-- name: heartbeat_start_jobs
-- Rows the report changes in nothing but a recent last_heartbeat are left alone
-- (see HEARTBEAT_REFRESH_STEP): "o" is the report's beat minus that step.
UPDATE j SET
    started_at = CASE WHEN j.server_id IS NULL OR j.server_id <> :server_id OR j.fence <> b.fence
                      THEN :now ELSE j.started_at END,
    status = 'processing',
    server_id = :server_id,
    fence = b.fence,
    last_heartbeat = b.beat,
    restarts = b.restarts,
    updated_at = :now,
    reason = NULL
FROM jobs AS j
JOIN OPENJSON(:batch) WITH (
        id VARCHAR(36) '$.id',
        fence BIGINT '$.f',
        beat DATETIME2(6) '$.h',
        restarts INT '$.r',
        refresh_before DATETIME2(6) '$.o') AS b
  ON j.id = b.id
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
JOIN OPENJSON(:batch) WITH (id VARCHAR(36) '$.id', fence BIGINT '$.f') AS b ON j.id = b.id
WHERE NOT (j.status = 'processing' AND j.server_id = :server_id AND j.fence = b.fence)
ORDER BY j.id;

-- name: heartbeat_release_unreported
UPDATE jobs SET status = CASE WHEN status = 'processing' THEN 'pending' ELSE status END,
                server_id = NULL, updated_at = :now, reason = :reason
WHERE server_id = :server_id
  AND status IN ('processing', 'deleting')
  AND id NOT IN (SELECT t.value FROM OPENJSON(:ids) AS t)
  AND (status <> 'processing' OR inplace_floor IS NULL OR inplace_floor < generation);

-- name: heartbeat_release_gone
-- A heartbeat that lists what changed (base set): release only the jobs it says are gone.
UPDATE jobs SET status = CASE WHEN status = 'processing' THEN 'pending' ELSE status END,
                server_id = NULL, updated_at = :now, reason = :reason
WHERE server_id = :server_id
  AND status IN ('processing', 'deleting')
  AND id IN (SELECT t.value FROM OPENJSON(:gone) AS t)
  AND (status <> 'processing' OR inplace_floor IS NULL OR inplace_floor < generation);

-- name: select_jobs_by_ids
SELECT j.* FROM jobs AS j
JOIN OPENJSON(:ids) WITH (id VARCHAR(36) '$') AS t ON j.id = t.id
ORDER BY j.id;

-- name: select_running_jobs_of_servers
SELECT j.* FROM jobs AS j
JOIN OPENJSON(:ids) WITH (id VARCHAR(255) '$') AS t ON j.server_id = t.id
WHERE j.status IN ('processing', 'deleting')
ORDER BY j.id;

-- name: claim_outbox
-- READPAST skips rows another manager holds; UPDLOCK keeps ours until commit.
WITH c AS (
    SELECT TOP (:limit) id, claimed_by, claimed_until, claim_id
    FROM outbox WITH (UPDLOCK, READPAST, ROWLOCK)
    WHERE claimed_until IS NULL OR claimed_until < :now
    ORDER BY id
)
UPDATE c SET claimed_by = :holder, claimed_until = :until, claim_id = :claim_id;

-- name: delete_outbox
DELETE FROM outbox WHERE id IN (SELECT CAST(t.value AS BIGINT) FROM OPENJSON(:ids) AS t);

-- name: delete_outbox_for_jobs
DELETE FROM outbox
WHERE job_id IN (SELECT t.value FROM OPENJSON(:ids) AS t) AND kind = :kind AND claimed_by = :holder;

-- name: insert_outbox_for_jobs
-- The outbox rows of jobs just inserted by create_jobs' multi-row INSERT.
INSERT INTO outbox (job_id, kind, generation, created_at, claimed_by, claimed_until)
SELECT j.id, :kind, j.generation, j.created_at, :holder, :lease_until
FROM jobs AS j
JOIN OPENJSON(:ids) WITH (id VARCHAR(36) '$') AS t ON j.id = t.id
ORDER BY j.id;

-- name: select_active_names
-- Which of these names are taken (a batch insert failed on the unique index);
-- compared in the column's binary collation.
SELECT j.id, j.name FROM jobs AS j
JOIN OPENJSON(:names) WITH (name NVARCHAR(400) '$') AS t
  ON j.name = t.name COLLATE Latin1_General_100_BIN2
WHERE j.status <> 'deleted';

-- name: lease_insert
INSERT INTO leases (name, holder, lease_until)
SELECT :name, :holder, :until
WHERE NOT EXISTS (SELECT 1 FROM leases WITH (UPDLOCK, HOLDLOCK) WHERE name = :name);

-- name: migrate_lock
EXEC sp_getapplock @Resource = :lock_name, @LockMode = 'Exclusive',
     @LockOwner = 'Session', @LockTimeout = 60000;

-- name: migrate_unlock
EXEC sp_releaseapplock @Resource = :lock_name, @LockOwner = 'Session';

-- name: create_schema_version
IF OBJECT_ID('schema_version', 'U') IS NULL
CREATE TABLE schema_version (
    version INT NOT NULL PRIMARY KEY,
    name NVARCHAR(200) NOT NULL,
    applied_at DATETIME2(6) NOT NULL
);
