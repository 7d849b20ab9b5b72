-- The per-job watchdog timeout (seconds) of the core's NewJob/JobRecord.
ALTER TABLE jobs ADD COLUMN heartbeat_timeout REAL NULL;
