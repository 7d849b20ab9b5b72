-- Indexes for every monitor filter and the paging order (id), and named leases.
CREATE INDEX jobs_status_id ON jobs (status, id);
CREATE INDEX jobs_server_id ON jobs (server_id, id) WHERE server_id IS NOT NULL;
CREATE INDEX jobs_name_id ON jobs (name, id);
CREATE INDEX servers_status_seen ON servers (status, last_seen);
CREATE INDEX servers_name_id ON servers (name, id);
CREATE INDEX outbox_claim_id ON outbox (claim_id);
CREATE TABLE leases (
    name VARCHAR(200) NOT NULL PRIMARY KEY,
    holder VARCHAR(255) NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL
);
-- Heartbeats rewrite every running job's row each few seconds; free space in
-- each page lets PostgreSQL update in place (HOT) without touching the indexes.
ALTER TABLE jobs SET (fillfactor = 80);
