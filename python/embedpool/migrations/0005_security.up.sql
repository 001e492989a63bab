-- API keys, the audit log and per-tenant usage (see embedpool.security).
--
-- api_keys holds only a SHA-256 of each key's secret: the secrets are 256 random bits, so a fast hash is
-- as strong as a slow one, and checking a request costs microseconds. Every change is announced on the
-- channel embedpool_keys (payload: the key's id), so that each server drops its cached copy: a revocation
-- reaches every replica within one notification.
CREATE TABLE api_keys (
    id           text             PRIMARY KEY CHECK (id ~ '^[0-9a-f]{12}$'),
    secret_hash  bytea            NOT NULL CHECK (octet_length(secret_hash) = 32),
    tenant       text             NOT NULL CHECK (tenant ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    role         text             NOT NULL CHECK (role IN ('reader', 'writer', 'admin')),
    collections  text             NOT NULL DEFAULT '*' CHECK (collections <> ''),
    tokens_per_s double precision CHECK (tokens_per_s > 0),
    docs_per_s   double precision CHECK (docs_per_s > 0),
    note         text             NOT NULL DEFAULT '',
    created_at   timestamptz      NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);

CREATE FUNCTION embedpool_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('embedpool_keys', CASE TG_OP WHEN 'DELETE' THEN OLD.id ELSE NEW.id END);
    RETURN NULL;
END
$$;
CREATE TRIGGER api_keys_changed AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION embedpool_keys_changed();

-- The audit log: append-only and hash-chained. Each row's hash covers the previous row's hash and its own
-- fields (embedpool.security.audit recomputes it independently), and seq has no gaps, so an edited, deleted
-- or inserted row breaks the chain for `embedpool audit verify`. The insert trigger assigns seq, time and
-- hashes under one lock, whatever the client sent; update, delete and truncate are refused by triggers
-- (which bind superusers too) and by revoked grants.
CREATE TABLE audit_log (
    seq        bigint      PRIMARY KEY,
    at         timestamptz NOT NULL,
    request_id text        NOT NULL,
    tenant     text        NOT NULL,
    key_id     text        NOT NULL,
    peer       text        NOT NULL,
    method     text        NOT NULL,
    collection text        NOT NULL,
    documents  bigint      NOT NULL,
    status     text        NOT NULL,
    prev_hash  bytea       NOT NULL,
    hash       bytea       NOT NULL
);

CREATE FUNCTION embedpool_audit_field(v text) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT octet_length(v)::text || ':' || v
$$;

CREATE FUNCTION embedpool_audit_chain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    last audit_log%ROWTYPE;
BEGIN
    PERFORM pg_advisory_xact_lock(7310593858020254828);  -- one appender at a time: seq and chain in order
    SELECT * INTO last FROM audit_log ORDER BY seq DESC LIMIT 1;
    NEW.seq := coalesce(last.seq, 0) + 1;
    NEW.at := clock_timestamp();
    NEW.prev_hash := coalesce(last.hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    NEW.hash := sha256(NEW.prev_hash || convert_to(
        embedpool_audit_field(NEW.seq::text)
        || embedpool_audit_field(((extract(epoch FROM NEW.at) * 1000000)::bigint)::text)
        || embedpool_audit_field(NEW.request_id)
        || embedpool_audit_field(NEW.tenant)
        || embedpool_audit_field(NEW.key_id)
        || embedpool_audit_field(NEW.peer)
        || embedpool_audit_field(NEW.method)
        || embedpool_audit_field(NEW.collection)
        || embedpool_audit_field(NEW.documents::text)
        || embedpool_audit_field(NEW.status),
        'UTF8'));
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_log_chain BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION embedpool_audit_chain();

CREATE FUNCTION embedpool_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only' USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION embedpool_audit_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION embedpool_audit_append_only();
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM PUBLIC;
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM CURRENT_USER;

-- What each tenant used, per hour: the table billing reads. Servers add their counts every few seconds.
CREATE TABLE tenant_usage (
    tenant    text        NOT NULL,
    hour      timestamptz NOT NULL,
    requests  bigint      NOT NULL DEFAULT 0,
    tokens    bigint      NOT NULL DEFAULT 0,
    documents bigint      NOT NULL DEFAULT 0,
    searches  bigint      NOT NULL DEFAULT 0,
    bytes_out bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, hour)
);
