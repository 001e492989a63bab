DROP TRIGGER IF EXISTS syncs_changed ON syncs;
DROP FUNCTION IF EXISTS embedpool_syncs_changed();
DROP TABLE IF EXISTS sync_progress;
DROP TABLE IF EXISTS syncs;
