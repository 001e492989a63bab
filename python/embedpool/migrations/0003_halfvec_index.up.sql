-- Per-collection choice of a half-precision HNSW index.
--
-- A halfvec index (on the expression embedding::halfvec(dim)) is half the size of a vector one, so twice the
-- collection stays in shared buffers; the table keeps float32 vectors, and searches rerank the index's
-- candidates exactly against them. Existing collections have vector indexes, which the default records.
ALTER TABLE collections
    ADD COLUMN hnsw_halfvec boolean NOT NULL DEFAULT false CHECK (NOT hnsw_halfvec OR metric = 'cosine');
