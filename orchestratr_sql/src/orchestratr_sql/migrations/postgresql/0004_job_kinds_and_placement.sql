-- Job kinds, placement constraints, spread groups and pending reasons; the kinds
-- and labels of servers (orchestratr_core.placement). Existing jobs become the
-- default kind without constraints; existing servers run the default kind.
ALTER TABLE jobs ADD COLUMN kind VARCHAR(63) NOT NULL DEFAULT 'default';
ALTER TABLE jobs ADD COLUMN requires VARCHAR(2200) NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN spread VARCHAR(63) NULL;
ALTER TABLE jobs ADD COLUMN pending_reason VARCHAR(500) NULL;
ALTER TABLE servers ADD COLUMN kinds TEXT NULL;
ALTER TABLE servers ADD COLUMN labels TEXT NULL;
-- jobs list --kind, and the leader's pending reasons by pool.
CREATE INDEX jobs_kind_id ON jobs (kind, id);
