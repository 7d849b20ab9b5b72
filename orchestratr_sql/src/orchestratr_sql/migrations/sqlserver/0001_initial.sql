-- Jobs, servers and the outbox (SQL Server 2016+). NOT VERIFIED against a real
-- SQL Server: parsed as T-SQL by the tests only. Binary (BIN2) collation: names
-- are case-sensitive. NVARCHAR(400): 200 code points may take 400 UTF-16 units.
CREATE TABLE jobs (
    id VARCHAR(36) NOT NULL CONSTRAINT jobs_pk PRIMARY KEY,
    name NVARCHAR(400) COLLATE Latin1_General_100_BIN2 NOT NULL,
    argument NVARCHAR(MAX) NOT NULL,
    status VARCHAR(16) NOT NULL
        CONSTRAINT jobs_status_check
        CHECK (status IN ('pending', 'processing', 'deleting', 'deleted', 'completed')),
    server_id NVARCHAR(255) NULL,
    fence BIGINT NOT NULL CONSTRAINT jobs_fence_default DEFAULT 0
        CONSTRAINT jobs_fence_check CHECK (fence >= 0),
    generation BIGINT NOT NULL,
    created_at DATETIME2(6) NOT NULL,
    updated_at DATETIME2(6) NOT NULL,
    started_at DATETIME2(6) NULL,
    last_heartbeat DATETIME2(6) NULL,
    restarts INT NOT NULL CONSTRAINT jobs_restarts_default DEFAULT 0,
    last_error NVARCHAR(MAX) NULL,
    reason NVARCHAR(MAX) NULL
);
-- One job per name among jobs that are not deleted (I5): a filtered unique index.
CREATE UNIQUE INDEX jobs_active_name_uq ON jobs (name) WHERE status <> 'deleted';
CREATE TABLE servers (
    id NVARCHAR(255) NOT NULL CONSTRAINT servers_pk PRIMARY KEY,
    name NVARCHAR(255) COLLATE Latin1_General_100_BIN2 NOT NULL,
    max_workers INT NOT NULL,
    host NVARCHAR(255) NOT NULL CONSTRAINT servers_host_default DEFAULT '',
    pid INT NOT NULL CONSTRAINT servers_pid_default DEFAULT 0,
    status VARCHAR(16) NOT NULL
        CONSTRAINT servers_status_check CHECK (status IN ('alive', 'draining', 'dead', 'left')),
    started_at DATETIME2(6) NOT NULL,
    last_seen DATETIME2(6) NOT NULL
);
CREATE TABLE outbox (
    id BIGINT IDENTITY(1, 1) NOT NULL CONSTRAINT outbox_pk PRIMARY KEY,
    job_id VARCHAR(36) NOT NULL
        CONSTRAINT outbox_job_fk FOREIGN KEY REFERENCES jobs (id) ON DELETE CASCADE,
    kind VARCHAR(16) NOT NULL CONSTRAINT outbox_kind_check CHECK (kind IN ('publish', 'cancel')),
    generation BIGINT NOT NULL,
    created_at DATETIME2(6) NOT NULL,
    claimed_by NVARCHAR(255) NULL,
    claimed_until DATETIME2(6) NULL,
    claim_id VARCHAR(36) NULL
);
CREATE INDEX outbox_job_id ON outbox (job_id);
