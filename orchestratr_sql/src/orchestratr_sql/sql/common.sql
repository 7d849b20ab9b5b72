-- Queries that read the same in every dialect. A dialect file (sqlite.sql,
-- postgresql.sql, mysql.sql, sqlserver.sql) adds the rest and may redefine one.
--
-- Every job status change below is one guarded UPDATE that mirrors a row of
-- orchestratr_core.job.TRANSITIONS: the source statuses and the guard are in
-- the WHERE clause, so a transition that is not allowed changes nothing and the
-- storage reports it from the affected-row count. In SET lists, started_at comes
-- first: MySQL evaluates single-table assignments left to right with the new
-- values, so it must read server_id and fence before they are overwritten.

-- name: insert_job
-- Also the row template of create_jobs' multi-row INSERT (queries.values_query).
INSERT INTO jobs (id, name, argument, status, server_id, fence, generation,
                  created_at, updated_at, restarts, heartbeat_timeout, kind, requires, spread)
VALUES (:id, :name, :argument, 'pending', NULL, 0, :generation, :now, :now, 0, :heartbeat_timeout,
        :job_kind, :requires, :spread);

-- name: insert_outbox
INSERT INTO outbox (job_id, kind, generation, created_at, claimed_by, claimed_until)
VALUES (:job_id, :kind, :generation, :now, :holder, :lease_until);

-- name: select_job
SELECT * FROM jobs WHERE id = :id;

-- name: transition_start
-- START: pending|processing -> processing, guard NEWER, sets the owner.
UPDATE jobs SET
    started_at = CASE WHEN server_id IS NULL OR server_id <> :server_id OR fence <> :fence
                      THEN :now ELSE started_at END,
    status = 'processing',
    server_id = :server_id,
    fence = :fence,
    last_heartbeat = :now,
    updated_at = :now,
    reason = :reason,
    restarts = COALESCE(:restarts, restarts)
WHERE id = :id
  AND status IN ('pending', 'processing')
  AND (fence < :fence OR (fence = :fence AND (server_id IS NULL OR server_id = :server_id)))
  -- Updated in place: no copy of a message of a superseded generation starts.
  AND (inplace_floor IS NULL OR :fence - inplace_floor * 4294967296 >= 4294967296
       OR (fence = :fence AND server_id = :server_id));

-- name: transition_release
-- RELEASE: processing -> pending, guard OWNER, clears the owner (keeps the fence).
UPDATE jobs SET status = 'pending', server_id = NULL, updated_at = :now, reason = :reason
WHERE id = :id AND status = 'processing' AND server_id = :server_id AND fence = :fence
  AND (inplace_floor IS NULL OR inplace_floor < generation);

-- name: transition_complete
-- COMPLETE: processing|pending -> completed, guard NOT_OLDER, clears the owner.
UPDATE jobs SET status = 'completed', server_id = NULL, updated_at = :now, reason = :reason
WHERE id = :id
  AND status IN ('processing', 'pending')
  AND (server_id IS NULL OR fence <= :fence);

-- name: transition_fail
-- FAIL: processing stays processing, guard OWNER; records the error.
UPDATE jobs SET last_error = :error, restarts = COALESCE(:restarts, restarts),
                updated_at = :now, reason = :reason
WHERE id = :id AND status = 'processing' AND server_id = :server_id AND fence = :fence;

-- name: transition_cancel
-- CANCEL: pending|processing (or held) -> deleting, no guard; the owner stays (it confirms).
UPDATE jobs SET status = 'deleting', updated_at = :now, reason = :reason
WHERE id = :id AND status IN ('pending', 'processing', 'pausing', 'paused', 'quarantined');

-- name: transition_confirm_deleted
-- CONFIRM_DELETED: deleting -> deleted, guard NOT_OLDER, clears the owner.
UPDATE jobs SET status = 'deleted', server_id = NULL, updated_at = :now, reason = :reason
WHERE id = :id
  AND status = 'deleting'
  AND (server_id IS NULL OR fence <= :fence);

-- name: release_server_jobs
-- SERVER_LOST in bulk: processing -> pending, deleting and held stay, owner cleared.
UPDATE jobs SET status = CASE WHEN status = 'processing' THEN 'pending' ELSE status END,
                server_id = NULL, updated_at = :now, reason = :reason
WHERE server_id = :server_id
  AND status IN ('processing', 'deleting', 'pausing', 'quarantined')
  -- A job updated in place under its generation: release_in_place (it republishes).
  AND (status <> 'processing' OR inplace_floor IS NULL OR inplace_floor < generation);

-- name: select_expired_servers
SELECT * FROM servers
WHERE status IN ('alive', 'draining') AND last_seen < :seen_before
ORDER BY id;

-- name: mark_server_dead
UPDATE servers SET status = 'dead'
WHERE id = :id AND status IN ('alive', 'draining') AND last_seen < :seen_before;

-- name: mark_server_left
UPDATE servers SET status = 'left' WHERE id = :id;

-- name: set_server_status
UPDATE servers SET status = :status WHERE id = :id;

-- name: select_server
SELECT * FROM servers WHERE id = :id;

-- name: select_running_jobs_of_server
SELECT * FROM jobs WHERE server_id = :server_id AND status IN ('processing', 'deleting') ORDER BY id;

-- name: select_cancelled_ids
-- Jobs that must never run again: completed ones too (a lost ack redelivers).
SELECT id FROM jobs
WHERE status = 'deleting' OR (status IN ('deleted', 'completed') AND updated_at >= :since)
ORDER BY id;

-- name: select_claimed_outbox
SELECT * FROM outbox WHERE claim_id = :claim_id ORDER BY id;

-- name: lease_update
UPDATE leases SET holder = :holder, lease_until = :until
WHERE name = :name AND (holder = :holder OR lease_until < :now);

-- name: select_schema_versions
SELECT version, name FROM schema_version ORDER BY version;

-- name: insert_schema_version
INSERT INTO schema_version (version, name, applied_at) VALUES (:version, :name, :now);

-- name: delete_outbox_for_job
DELETE FROM outbox WHERE job_id = :job_id AND kind = :kind AND claimed_by = :holder;

-- name: pending_pools
-- How many jobs wait in each pool (kind and constraints): the leader's pending reasons.
SELECT kind, requires, COUNT(*) AS pending FROM jobs
WHERE status = 'pending'
GROUP BY kind, requires;

-- name: set_pending_reason
UPDATE jobs SET pending_reason = :reason
WHERE status = 'pending' AND kind = :kind AND requires = :requires
  AND (pending_reason IS NULL OR pending_reason <> :reason);

-- name: clear_pending_reason
UPDATE jobs SET pending_reason = NULL
WHERE status = 'pending' AND kind = :kind AND requires = :requires
  AND pending_reason IS NOT NULL;

-- name: count_running_by_pool
-- Rebalancing by pool: running jobs per server, kind and constraints.
SELECT server_id, kind, requires, COUNT(*) AS running FROM jobs
WHERE status = 'processing' AND server_id IS NOT NULL
GROUP BY server_id, kind, requires;

-- name: running_spread_jobs
-- Spread separation: the running jobs that name a spread group, nothing else.
SELECT id, server_id, kind, requires, spread, fence FROM jobs
WHERE status = 'processing' AND server_id IS NOT NULL AND spread IS NOT NULL
ORDER BY id;

-- name: count_running_by_server
-- Rebalancing counts, not jobs: one aggregate instead of reading every running row.
SELECT server_id, COUNT(*) AS running FROM jobs
WHERE status = 'processing' AND server_id IS NOT NULL
GROUP BY server_id;

-- Lifecycle controls (orchestratr_core.lifecycle).

-- name: transition_pause
-- PAUSE: pending|processing -> pausing, no guard; the owner stays (it confirms).
UPDATE jobs SET status = 'pausing', updated_at = :now, reason = :reason
WHERE id = :id AND status IN ('pending', 'processing');

-- name: transition_confirm_held
-- CONFIRM_HELD: pausing -> paused, quarantined stays (with its reason), guard
-- NOT_OLDER, clears the owner. reason before status: MySQL assigns left to right.
UPDATE jobs SET reason = CASE WHEN status = 'quarantined' THEN reason ELSE :reason END,
                status = CASE WHEN status = 'pausing' THEN 'paused' ELSE status END,
                server_id = NULL, updated_at = :now
WHERE id = :id
  AND status IN ('pausing', 'quarantined')
  AND (server_id IS NULL OR fence <= :fence);

-- name: transition_resume
-- RESUME: paused|quarantined -> pending, guard UNOWNED, a new generation and a
-- fresh restart budget (the failure log is emptied; failure_seq moves on, so that
-- a failure counted from the state before the resume loses its compare-and-set).
UPDATE jobs SET status = 'pending', generation = generation + 1, updated_at = :now,
                reason = :reason, failure_log = NULL, failure_seq = failure_seq + 1
WHERE id = :id AND status IN ('paused', 'quarantined') AND server_id IS NULL;

-- name: raise_pending_generation
-- A new generation for a job that waits for a server, before the outbox relay
-- sends its message again (Storage.raise_pending_generation): only while it is
-- pending, unowned and still at the generation the relay read.
UPDATE jobs SET generation = generation + 1
WHERE id = :id AND generation = :generation AND status = 'pending' AND server_id IS NULL;

-- name: transition_quarantine
-- QUARANTINE: processing -> quarantined, guard OWNER; records the error.
UPDATE jobs SET status = 'quarantined', last_error = COALESCE(:error, last_error),
                restarts = COALESCE(:restarts, restarts), updated_at = :now, reason = :reason
WHERE id = :id AND status = 'processing' AND server_id = :server_id AND fence = :fence;

-- name: save_checkpoint
-- A checkpoint of the job's recorded owner only (guard OWNER), never below the
-- token of the checkpoint it replaces (I9).
UPDATE jobs SET checkpoint = :checkpoint, checkpoint_fence = :fence, checkpoint_at = :now
WHERE id = :id
  AND status NOT IN ('deleted', 'completed')
  AND server_id = :server_id AND fence = :fence
  AND (checkpoint_fence IS NULL OR checkpoint_fence <= :fence);

-- name: select_held_jobs
-- Held jobs and their generation: the hold marks of the servers' cancellation set.
SELECT id, generation FROM jobs WHERE status IN ('pausing', 'paused', 'quarantined') ORDER BY id;

-- name: set_restart_budget
UPDATE jobs SET max_restarts = :max_restarts, restart_window = :restart_window WHERE id = :id;

-- name: record_failure
-- One more failure, compare-and-set on failure_seq; a spent budget quarantines a
-- live job (owner kept: it confirms). reason before status: MySQL assigns left to right.
UPDATE jobs SET
    reason = CASE WHEN :quarantined = 1 AND status IN ('pending', 'processing')
                  THEN :quarantine ELSE reason END,
    status = CASE WHEN :quarantined = 1 AND status IN ('pending', 'processing')
                  THEN 'quarantined' ELSE status END,
    failure_seq = failure_seq + 1,
    failure_log = :failure_log,
    updated_at = :now
WHERE id = :id AND failure_seq = :seq AND status NOT IN ('deleted', 'completed');

-- Updating a job's argument (Storage.request_update).

-- name: request_update
-- A live job (pending|processing) -> pausing with update_pending: its copy is
-- stopped, and CONFIRM_HELD restarts it under a new generation. A held one keeps
-- its status. Never a deleting or final job. Status last: MySQL assigns left to right.
UPDATE jobs SET
    update_pending = CASE WHEN status IN ('pending', 'processing') THEN 1 ELSE update_pending END,
    update_floor = CASE WHEN status IN ('pending', 'processing') THEN generation ELSE update_floor END,
    reason = CASE WHEN status IN ('pending', 'processing') THEN :reason ELSE reason END,
    status = CASE WHEN status IN ('pending', 'processing') THEN 'pausing' ELSE status END,
    argument = :argument, argument_version = argument_version + 1,
    argument_updated_at = :now, updated_at = :now
WHERE id = :id AND status IN ('pending', 'processing', 'pausing', 'paused', 'quarantined');

-- name: transition_confirm_update
-- CONFIRM_HELD of a pausing job an update stopped (guard NOT_OLDER, clears the
-- owner): pending under a new generation, with the new argument. The fence is
-- raised to the new generation's floor, so the START of any older message's copy
-- (the old argument) fails the NEWER guard. fence before generation: MySQL
-- assigns left to right.
UPDATE jobs SET fence = (generation + 1) * 4294967296, status = 'pending',
                generation = generation + 1, update_pending = 0,
                server_id = NULL, updated_at = :now, reason = :reason
WHERE id = :id
  AND status = 'pausing' AND update_pending = 1
  AND (server_id IS NULL OR fence <= :fence);

-- name: pause_updating
-- A pause of a job an update is stopping: it ends paused instead of restarting.
UPDATE jobs SET update_pending = 0, reason = :reason, updated_at = :now
WHERE id = :id AND status = 'pausing' AND update_pending = 1;

-- name: select_update_floors
-- Recently updated live jobs and the generation their update superseded.
SELECT id, update_floor FROM jobs
WHERE argument_updated_at >= :since AND update_floor IS NOT NULL
  AND status IN ('pending', 'processing', 'deleting')
ORDER BY id;

-- Updating a job's argument in place (Storage.request_update_in_place).

-- name: request_update_in_place
-- A running job whose owner takes the argument without a restart: it stays
-- processing (owner, fence and generation as read), inplace_floor := generation.
-- Only while the owner is alive and no live server reads no drop marks
-- (updatable NULL: an older version).
UPDATE jobs SET argument = :argument, argument_version = argument_version + 1,
                argument_updated_at = :now, updated_at = :now,
                inplace_floor = generation, reason = :reason
WHERE id = :id AND status = 'processing' AND server_id = :server_id AND fence = :fence
  AND generation = :generation
  AND EXISTS (SELECT 1 FROM servers AS o WHERE o.id = :server_id AND o.status = 'alive')
  AND NOT EXISTS (SELECT 1 FROM servers AS s
                  WHERE s.status IN ('alive', 'draining') AND s.updatable IS NULL);

-- name: record_update_applied
-- JobUpdated: the owner's copy (guard OWNER) took this version in place.
UPDATE jobs SET argument_applied_version = :version
WHERE id = :id AND status = 'processing' AND server_id = :server_id AND fence = :fence
  AND inplace_floor >= generation
  AND argument_applied_version < :version AND argument_version >= :version;

-- name: select_unapplied_updates
SELECT * FROM jobs
WHERE argument_updated_at >= :since AND status = 'processing'
  AND inplace_floor >= generation AND argument_applied_version < argument_version
ORDER BY id;

-- name: fall_back_update
-- No acknowledgement in time: the restart of request_update, guarded on the
-- version (a newer update or a late acknowledgement wins). Status last: MySQL.
UPDATE jobs SET update_pending = 1, update_floor = generation, reason = :reason,
                updated_at = :now, status = 'pausing'
WHERE id = :id AND status = 'processing' AND inplace_floor >= generation
  AND argument_version = :version AND argument_applied_version < :version;

-- name: select_inplace_floors
-- Recently updated-in-place jobs: the drop marks of the servers' cancellation set.
SELECT id, inplace_floor FROM jobs
WHERE argument_updated_at >= :since AND inplace_floor IS NOT NULL
  AND status IN ('pending', 'processing', 'deleting')
ORDER BY id;

-- name: select_inplace_releases
-- The running jobs of a server updated in place under their generation.
SELECT id, generation FROM jobs
WHERE server_id = :server_id AND status = 'processing' AND inplace_floor >= generation
ORDER BY id;

-- name: release_in_place
-- A release (SERVER_LOST, a heartbeat's) of a job updated in place: pending under
-- a new generation, fence raised to its floor (a copy of the old message fails
-- START's guard); the caller inserts its publish row. fence first: MySQL.
UPDATE jobs SET fence = (generation + 1) * 4294967296, status = 'pending',
                generation = generation + 1, server_id = NULL,
                updated_at = :now, reason = :reason
WHERE id = :id AND server_id = :server_id AND status = 'processing'
  AND inplace_floor >= generation AND generation = :generation;

-- name: transition_release_in_place
-- RELEASE (guard OWNER) of a job updated in place: as release_in_place.
UPDATE jobs SET fence = (generation + 1) * 4294967296, status = 'pending',
                generation = generation + 1, server_id = NULL,
                updated_at = :now, reason = :reason
WHERE id = :id AND status = 'processing' AND server_id = :server_id AND fence = :fence
  AND inplace_floor >= generation;
