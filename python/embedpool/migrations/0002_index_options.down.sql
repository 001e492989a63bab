DROP INDEX IF EXISTS documents_metadata;
ALTER TABLE collections DROP COLUMN IF EXISTS hnsw_ef_construction, DROP COLUMN IF EXISTS hnsw_m;
