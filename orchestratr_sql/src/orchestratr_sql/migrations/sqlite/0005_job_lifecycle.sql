-- Job lifecycle controls: held statuses (pause, quarantine), checkpoints under a
-- fence, and the restart budget (orchestratr_core.lifecycle).
ALTER TABLE jobs ADD COLUMN checkpoint TEXT NULL;
ALTER TABLE jobs ADD COLUMN checkpoint_fence INTEGER NULL;
ALTER TABLE jobs ADD COLUMN checkpoint_at TEXT NULL;
ALTER TABLE jobs ADD COLUMN max_restarts INTEGER NULL;
ALTER TABLE jobs ADD COLUMN restart_window REAL NULL;
ALTER TABLE jobs ADD COLUMN failure_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN failure_log TEXT NULL;
-- SQLite cannot alter a CHECK constraint: the status list is widened in the stored
-- table definition (sqlite.org/lang_altertable.html, "making other kinds of table
-- schema changes": safe for a constraint every existing row satisfies, whatever
-- columns other migrations added). After the ALTERs: they edit the definition by
-- offsets of the schema as loaded. RESET reloads it on this connection; the index
-- after it changes the schema cookie, so every other connection reloads it too.
PRAGMA writable_schema = ON;
UPDATE sqlite_master
SET sql = replace(sql, '''deleting'', ''deleted'', ''completed'')',
                  '''deleting'', ''deleted'', ''completed'', ''pausing'', ''paused'', ''quarantined'')')
WHERE type = 'table' AND name = 'jobs';
PRAGMA writable_schema = RESET;
-- The held jobs (the hold marks of the servers' cancellation set), read by every sync.
CREATE INDEX jobs_held ON jobs (id) WHERE status IN ('pausing', 'paused', 'quarantined');
