-- Jobs, servers and the outbox. Times are UTC text 'YYYY-MM-DD HH:MM:SS.ffffff'.
CREATE TABLE jobs (
    id TEXT NOT NULL PRIMARY KEY,
    name TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    argument TEXT NOT NULL,
    status TEXT NOT NULL
        CHECK (status IN ('pending', 'processing', 'deleting', 'deleted', 'completed')),
    server_id TEXT,
    fence INTEGER NOT NULL DEFAULT 0 CHECK (fence >= 0),
    generation INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    started_at TEXT,
    last_heartbeat TEXT,
    restarts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    reason TEXT
);
-- One job per name among jobs that are not deleted (I5): the database decides.
CREATE UNIQUE INDEX jobs_active_name_uq ON jobs (name) WHERE status <> 'deleted';
CREATE TABLE servers (
    id TEXT NOT NULL PRIMARY KEY,
    name TEXT NOT NULL,
    max_workers INTEGER NOT NULL,
    host TEXT NOT NULL DEFAULT '',
    pid INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL CHECK (status IN ('alive', 'draining', 'dead', 'left')),
    started_at TEXT NOT NULL,
    last_seen TEXT NOT NULL
);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('publish', 'cancel')),
    generation INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    claimed_by TEXT,
    claimed_until TEXT,
    claim_id TEXT
);
CREATE INDEX outbox_job_id ON outbox (job_id);
