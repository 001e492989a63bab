DROP TABLE IF EXISTS tenant_usage;
DROP TABLE IF EXISTS audit_log;
DROP FUNCTION IF EXISTS embedpool_audit_append_only();
DROP FUNCTION IF EXISTS embedpool_audit_chain();
DROP FUNCTION IF EXISTS embedpool_audit_field(text);
DROP TABLE IF EXISTS api_keys;
DROP FUNCTION IF EXISTS embedpool_keys_changed();
