-- Updating a job's argument in place (functions marked @updatable): the generation
-- whose running copy took the new argument without a restart (its older messages
-- are dropped by a drop mark "<id>@<floor>!", and a release republishes the job
-- under a new generation), the argument version its owner acknowledged, and the
-- kinds a server applies updates to in place (NULL: a server that reads no drop
-- marks, of an older version).
ALTER TABLE jobs ADD COLUMN inplace_floor INTEGER NULL;
ALTER TABLE jobs ADD COLUMN argument_applied_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE servers ADD COLUMN updatable TEXT NULL;
