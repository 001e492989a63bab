-- Per-collection HNSW build parameters, and an index for metadata filters.
--
-- Existing collections were built with pgvector's defaults (m=16, ef_construction=64), which is what the
-- column defaults record for them; new collections get the store's defaults, written explicitly.
-- pgvector's bounds: m 2..100, ef_construction 4..1000 and at least 2 * m.
ALTER TABLE collections
    ADD COLUMN hnsw_m               integer NOT NULL DEFAULT 16 CHECK (hnsw_m BETWEEN 2 AND 100),
    ADD COLUMN hnsw_ef_construction integer NOT NULL DEFAULT 64
        CHECK (hnsw_ef_construction BETWEEN 4 AND 1000 AND hnsw_ef_construction >= 2 * hnsw_m);

-- A partitioned index: every partition, present and future, gets its own GIN index on metadata. With it the
-- planner can answer a selective `metadata @> filter` exactly (bitmap scan of the matching rows, then a sort
-- by distance) instead of walking the HNSW graph past thousands of rows that the filter rejects.
-- jsonb_path_ops: smaller and faster than the default opclass, and @> is the only operator searches use.
CREATE INDEX documents_metadata ON documents USING gin (metadata jsonb_path_ops);
