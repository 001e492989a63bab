-- Collections and their documents.
--
-- Why one documents table PARTITIONED BY LIST (collection_id), one partition per collection:
-- an HNSW index needs a fixed dimension, and collections differ in dim (one per model). The parent column is
-- an unconstrained `vector`; each partition (created with its collection, named documents_c<collection id>,
-- never after user text) checks its dim and carries its own HNSW index on the expression
-- (embedding::vector(<dim>)), so every collection gets a fixed-dim index while schema migrations still alter
-- one table. Dropping a collection drops its partition: instant, no bulk DELETE, no index bloat left behind.
-- The partition key also makes a foreign key to collections redundant (a row with no partition cannot be
-- stored), which keeps a per-row RI check off the ingest path.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE collections (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       text        NOT NULL UNIQUE CHECK (name <> ''),
    model      text        NOT NULL,
    dim        integer     NOT NULL CHECK (dim BETWEEN 1 AND 2000),  -- 2000: pgvector's HNSW limit for vector
    metric     text        NOT NULL CHECK (metric IN ('cosine', 'l2', 'ip')),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE documents (
    collection_id bigint      NOT NULL,
    id            text        NOT NULL CHECK (octet_length(id) BETWEEN 1 AND 512),
    text          text        NOT NULL,
    metadata      jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    content_hash  bytea       NOT NULL,
    embedding     vector      NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection_id, id)
) PARTITION BY LIST (collection_id);
