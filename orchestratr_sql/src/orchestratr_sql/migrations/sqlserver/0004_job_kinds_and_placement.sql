-- Job kinds, placement constraints, spread groups and pending reasons; the kinds
-- and labels of servers (orchestratr_core.placement). Existing jobs become the
-- default kind without constraints; existing servers run the default kind.
-- NOT VERIFIED against a real SQL Server: parsed as T-SQL by the tests only.
ALTER TABLE jobs ADD kind VARCHAR(63) NOT NULL CONSTRAINT jobs_kind_default DEFAULT 'default';
ALTER TABLE jobs ADD requires VARCHAR(2200) NOT NULL CONSTRAINT jobs_requires_default DEFAULT '';
ALTER TABLE jobs ADD spread VARCHAR(63) NULL;
ALTER TABLE jobs ADD pending_reason NVARCHAR(500) NULL;
ALTER TABLE servers ADD kinds NVARCHAR(MAX) NULL;
ALTER TABLE servers ADD labels NVARCHAR(MAX) NULL;
-- jobs list --kind, and the leader's pending reasons by pool.
CREATE INDEX jobs_kind_id ON jobs (kind, id);
