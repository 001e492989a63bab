-- Syncs (embedpool sync create): each keeps a collection equal to a table of the user's database. The
-- definition and its progress live here; the change queue and the triggers that fill it live in the source
-- database (embedpool.store.sync_source installs them there, in schema embedpool_sync).
CREATE TABLE syncs (
    name             text        PRIMARY KEY,
    database         text        NOT NULL,  -- a name from --sync-databases; 'default' is this database
    source_schema    text        NOT NULL,
    source_table     text        NOT NULL,
    id_column        text        NOT NULL,
    id_type          text        NOT NULL,  -- format_type() of the id column: ids are read back as this type
    text_expr        text        NOT NULL,
    metadata_columns text[]      NOT NULL DEFAULT '{}',
    where_expr       text        NOT NULL DEFAULT '',
    collection       text        NOT NULL,
    paused           boolean     NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- Rows stored and rows failed per sync in 10-second buckets, from every replica: what `sync status` reports
-- as rows/s. Old buckets are pruned by the workers.
CREATE TABLE sync_progress (
    sync     text        NOT NULL REFERENCES syncs (name) ON DELETE CASCADE,
    bucket   timestamptz NOT NULL,
    rows     bigint      NOT NULL DEFAULT 0,
    failures bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (sync, bucket)
);

-- Workers of every replica hear of created, paused, resumed and dropped syncs at once.
CREATE FUNCTION embedpool_syncs_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('embedpool_syncs', CASE TG_OP WHEN 'DELETE' THEN OLD.name ELSE NEW.name END);
    RETURN NULL;
END
$$;
CREATE TRIGGER syncs_changed AFTER INSERT OR UPDATE OR DELETE ON syncs
    FOR EACH ROW EXECUTE FUNCTION embedpool_syncs_changed();
