-- Before 0007 every collection stored float32 `embedding`: float16 ones get theirs back from the halfvec values
-- (exactly: float16 widens to float32 without loss), and every non-float32 collection's index is rebuilt as
-- the vector index the older code searches (same name and options), unless a bulk load left it without one.
DO $$
DECLARE
    c record;
    part text;
    index text;
BEGIN
    FOR c IN SELECT conrelid::regclass AS part FROM pg_constraint WHERE conname = 'embedding_stored' LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT embedding_stored', c.part);
    END LOOP;
    FOR c IN SELECT id, dim, storage, hnsw_m, hnsw_ef_construction FROM collections
              WHERE storage <> 'float32' AND to_regclass(format('%I', 'documents_c' || id)) IS NOT NULL LOOP
        part := 'documents_c' || c.id;
        index := part || '_hnsw';
        IF c.storage = 'float16' THEN
            EXECUTE format('UPDATE %I SET embedding = embedding_half::vector', part);
        END IF;
        IF to_regclass(format('%I', index)) IS NOT NULL THEN
            EXECUTE format('DROP INDEX %I', index);
            EXECUTE format(
                'CREATE INDEX %I ON %I USING hnsw ((embedding::vector(%s)) vector_cosine_ops)'
                ' WITH (m = %s, ef_construction = %s)', index, part, c.dim, c.hnsw_m, c.hnsw_ef_construction);
        END IF;
    END LOOP;
END
$$;
-- Takes the float16 partitions' dim checks (on embedding_half) with them: they are put back on `embedding`.
ALTER TABLE documents DROP COLUMN IF EXISTS embedding_half, DROP COLUMN IF EXISTS embedding_bits;
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT id, dim FROM collections
              WHERE storage = 'float16' AND to_regclass(format('%I', 'documents_c' || id)) IS NOT NULL LOOP
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT embedding_dim CHECK (vector_dims(embedding) = %s)',
                       'documents_c' || c.id, c.dim);
    END LOOP;
END
$$;
ALTER TABLE documents ALTER COLUMN embedding SET NOT NULL;
ALTER TABLE collections DROP CONSTRAINT IF EXISTS halfvec_index_needs_float32_storage, DROP COLUMN IF EXISTS storage;
