-- Job kinds, placement constraints, spread groups and pending reasons; the kinds
-- and labels of servers (orchestratr_core.placement). Existing jobs become the
-- default kind without constraints; existing servers run the default kind.
ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'default';
ALTER TABLE jobs ADD COLUMN requires TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN spread TEXT NULL;
ALTER TABLE jobs ADD COLUMN pending_reason TEXT NULL;
ALTER TABLE servers ADD COLUMN kinds TEXT NULL;
ALTER TABLE servers ADD COLUMN labels TEXT NULL;
-- jobs list --kind, and the leader's pending reasons by pool.
CREATE INDEX jobs_kind_id ON jobs (kind, id);
