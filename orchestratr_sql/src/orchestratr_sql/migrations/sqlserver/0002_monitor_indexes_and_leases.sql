-- Indexes for every monitor filter and the paging order (id), and named leases.
CREATE INDEX jobs_status_id ON jobs (status, id);
CREATE INDEX jobs_server_id ON jobs (server_id, id) WHERE server_id IS NOT NULL;
CREATE INDEX jobs_name_id ON jobs (name, id);
CREATE INDEX servers_status_seen ON servers (status, last_seen);
CREATE INDEX servers_name_id ON servers (name, id);
CREATE INDEX outbox_claim_id ON outbox (claim_id);
CREATE TABLE leases (
    name NVARCHAR(200) NOT NULL CONSTRAINT leases_pk PRIMARY KEY,
    holder NVARCHAR(255) NOT NULL,
    lease_until DATETIME2(6) NOT NULL
);
