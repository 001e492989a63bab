-- Every change to a collection's row is announced on the channel embedpool_collections (payload: its name),
-- so that each server sharing the database drops its cached copy: a cache that stays right across replicas
-- without a query per request. Notifications are sent at commit, whichever client made the change.
CREATE FUNCTION embedpool_collections_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('embedpool_collections', CASE TG_OP WHEN 'DELETE' THEN OLD.name ELSE NEW.name END);
    RETURN NULL;
END
$$;
CREATE TRIGGER collections_changed AFTER INSERT OR UPDATE OR DELETE ON collections
    FOR EACH ROW EXECUTE FUNCTION embedpool_collections_changed();
