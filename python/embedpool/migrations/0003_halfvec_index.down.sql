-- Before 0003 every index was a vector index: rebuild the halfvec ones as such (same name, same options), so
-- that the older code's searches find an index for their ORDER BY expression.
DO $$
DECLARE
    c record;
BEGIN
    -- A collection without its index (a bulk load in progress) stays without: the load builds it.
    FOR c IN SELECT id, dim, hnsw_m, hnsw_ef_construction FROM collections
              WHERE hnsw_halfvec AND to_regclass(format('%I', 'documents_c' || id || '_hnsw')) IS NOT NULL LOOP
        EXECUTE format('DROP INDEX %I', 'documents_c' || c.id || '_hnsw');
        EXECUTE format(
            'CREATE INDEX %I ON %I USING hnsw ((embedding::vector(%s)) vector_cosine_ops)'
            ' WITH (m = %s, ef_construction = %s)',
            'documents_c' || c.id || '_hnsw', 'documents_c' || c.id, c.dim, c.hnsw_m, c.hnsw_ef_construction);
    END LOOP;
END
$$;
ALTER TABLE collections DROP COLUMN IF EXISTS hnsw_halfvec;
