-- Job lifecycle controls: held statuses (pause, quarantine), checkpoints under a
-- fence, and the restart budget (orchestratr_core.lifecycle).
ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('pending', 'processing', 'deleting', 'deleted', 'completed', 'pausing', 'paused', 'quarantined'));
ALTER TABLE jobs ADD checkpoint NVARCHAR(MAX) NULL;
ALTER TABLE jobs ADD checkpoint_fence BIGINT NULL;
ALTER TABLE jobs ADD checkpoint_at DATETIME2(6) NULL;
ALTER TABLE jobs ADD max_restarts INT NULL;
ALTER TABLE jobs ADD restart_window FLOAT NULL;
ALTER TABLE jobs ADD failure_seq INT NOT NULL CONSTRAINT jobs_failure_seq_default DEFAULT 0;
ALTER TABLE jobs ADD failure_log NVARCHAR(MAX) NULL;
