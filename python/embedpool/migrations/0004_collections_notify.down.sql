DROP TRIGGER IF EXISTS collections_changed ON collections;
DROP FUNCTION IF EXISTS embedpool_collections_changed();
