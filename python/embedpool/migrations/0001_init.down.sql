-- Partitions go with their parent. The vector extension stays: it is database-wide and may have other users.
DROP TABLE IF EXISTS documents;
DROP TABLE IF EXISTS collections;
