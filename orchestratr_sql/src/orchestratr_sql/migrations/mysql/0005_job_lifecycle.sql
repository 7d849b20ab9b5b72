-- Job lifecycle controls: held statuses (pause, quarantine), checkpoints under a
-- fence, and the restart budget (orchestratr_core.lifecycle).
ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('pending', 'processing', 'deleting', 'deleted', 'completed', 'pausing', 'paused', 'quarantined'));
ALTER TABLE jobs ADD COLUMN checkpoint MEDIUMTEXT NULL;
ALTER TABLE jobs ADD COLUMN checkpoint_fence BIGINT NULL;
ALTER TABLE jobs ADD COLUMN checkpoint_at DATETIME(6) NULL;
ALTER TABLE jobs ADD COLUMN max_restarts INT NULL;
ALTER TABLE jobs ADD COLUMN restart_window DOUBLE NULL;
ALTER TABLE jobs ADD COLUMN failure_seq INT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN failure_log MEDIUMTEXT NULL;
