-- Indexes for every monitor filter and the paging order (id), and named leases.
CREATE INDEX jobs_status_id ON jobs (status, id);
CREATE INDEX jobs_server_id ON jobs (server_id, id) WHERE server_id IS NOT NULL;
CREATE INDEX jobs_name_id ON jobs (name, id);
CREATE INDEX servers_status_seen ON servers (status, last_seen);
CREATE INDEX servers_name_id ON servers (name, id);
CREATE INDEX outbox_claim_id ON outbox (claim_id);
CREATE TABLE leases (
    name TEXT NOT NULL PRIMARY KEY,
    holder TEXT NOT NULL,
    lease_until TEXT NOT NULL
);
