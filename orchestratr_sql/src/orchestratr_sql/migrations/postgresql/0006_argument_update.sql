-- Live update of a job's argument (OrchestratorClient.update): how many updates,
-- when the last one was made, whether the job restarts under a new generation
-- once its stopped copy is confirmed, and the generation the update superseded.
ALTER TABLE jobs ADD COLUMN argument_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN argument_updated_at TIMESTAMPTZ NULL;
ALTER TABLE jobs ADD COLUMN update_pending SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN update_floor BIGINT NULL;
-- The recently updated jobs (the update floors of the servers' cancellation set).
CREATE INDEX jobs_argument_updated ON jobs (argument_updated_at) WHERE argument_updated_at IS NOT NULL;
