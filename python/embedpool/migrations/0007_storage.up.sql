-- Per-collection storage of the vectors (CreateCollection's `storage`):
--   float32  `embedding vector`, as before: every existing collection.
--   float16  `embedding_half halfvec` only (embedding NULL): half the bytes; the HNSW index is over the halfvec
--            column and searches rerank its candidates exactly on the stored half-precision values.
--   binary   `embedding_bits bit varying` (binary_quantize: one bit a component, 1 where it is > 0) for a
--            Hamming-distance HNSW index, plus `embedding` kept for the exact float rerank of its candidates.
-- The parent's columns must be the same for every partition, so `embedding` becomes nullable and each new
-- partition checks what its storage keeps (embedpool.store.collections). Existing partitions get that check
-- NOT VALID: it binds every new row without scanning the rows already there, which all have a vector.
ALTER TABLE collections
    ADD COLUMN storage text NOT NULL DEFAULT 'float32' CHECK (storage IN ('float32', 'float16', 'binary')),
    ADD CONSTRAINT halfvec_index_needs_float32_storage CHECK (NOT hnsw_halfvec OR storage = 'float32');

ALTER TABLE documents
    ALTER COLUMN embedding DROP NOT NULL,
    ADD COLUMN embedding_half halfvec,
    ADD COLUMN embedding_bits bit varying;

DO $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT id FROM collections WHERE to_regclass(format('%I', 'documents_c' || id)) IS NOT NULL LOOP
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT embedding_stored CHECK (embedding IS NOT NULL) NOT VALID',
                       'documents_c' || c.id);
    END LOOP;
END
$$;
