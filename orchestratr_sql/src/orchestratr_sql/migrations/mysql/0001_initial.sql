-- Jobs, servers and the outbox (MySQL 8 / MariaDB 10.6+, InnoDB). Binary
-- collation: names are case-sensitive and compared by code point.
CREATE TABLE jobs (
    id VARCHAR(36) NOT NULL,
    name VARCHAR(200) NOT NULL,
    argument MEDIUMTEXT NOT NULL,
    status VARCHAR(16) NOT NULL,
    server_id VARCHAR(255) NULL,
    fence BIGINT NOT NULL DEFAULT 0,
    generation BIGINT NOT NULL,
    created_at DATETIME(6) NOT NULL,
    updated_at DATETIME(6) NOT NULL,
    started_at DATETIME(6) NULL,
    last_heartbeat DATETIME(6) NULL,
    restarts INT NOT NULL DEFAULT 0,
    last_error MEDIUMTEXT NULL,
    reason TEXT NULL,
    -- MySQL has no partial index. active_name is the name while the job is not
    -- deleted and NULL afterwards; NULLs never collide in a UNIQUE index, so this
    -- is "one job per name among jobs that are not deleted" (I5).
    active_name VARCHAR(200) GENERATED ALWAYS AS (IF(status <> 'deleted', name, NULL)) STORED,
    PRIMARY KEY (id),
    UNIQUE KEY jobs_active_name_uq (active_name),
    CONSTRAINT jobs_name_length CHECK (CHAR_LENGTH(name) BETWEEN 1 AND 200),
    CONSTRAINT jobs_status_check
        CHECK (status IN ('pending', 'processing', 'deleting', 'deleted', 'completed')),
    CONSTRAINT jobs_fence_check CHECK (fence >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE TABLE servers (
    id VARCHAR(255) NOT NULL PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    max_workers INT NOT NULL,
    host VARCHAR(255) NOT NULL DEFAULT '',
    pid INT NOT NULL DEFAULT 0,
    status VARCHAR(16) NOT NULL,
    started_at DATETIME(6) NOT NULL,
    last_seen DATETIME(6) NOT NULL,
    CONSTRAINT servers_status_check CHECK (status IN ('alive', 'draining', 'dead', 'left'))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE TABLE outbox (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    job_id VARCHAR(36) NOT NULL,
    kind VARCHAR(16) NOT NULL,
    generation BIGINT NOT NULL,
    created_at DATETIME(6) NOT NULL,
    claimed_by VARCHAR(255) NULL,
    claimed_until DATETIME(6) NULL,
    claim_id VARCHAR(36) NULL,
    KEY outbox_job_id (job_id),
    CONSTRAINT outbox_job_fk FOREIGN KEY (job_id) REFERENCES jobs (id) ON DELETE CASCADE,
    CONSTRAINT outbox_kind_check CHECK (kind IN ('publish', 'cancel'))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
