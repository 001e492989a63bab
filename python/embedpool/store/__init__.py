"""Postgres + pgvector storage: migrations, the COPY writer, search, an embedded server."""

from embedpool.store.collections import HnswOptions
from embedpool.store.embedded import EmbeddedPostgres, default_data_dir, running_postgres
from embedpool.store.migrations import migrate_down, migrate_up
from embedpool.store.records import CollectionInfo, CollectionStats, DocumentRow, Hit, UpsertResult
from embedpool.store.store import Store
from embedpool.store.writer import StaleAssumption

__all__ = [
    "CollectionInfo",
    "CollectionStats",
    "DocumentRow",
    "EmbeddedPostgres",
    "Hit",
    "HnswOptions",
    "StaleAssumption",
    "Store",
    "UpsertResult",
    "default_data_dir",
    "migrate_down",
    "migrate_up",
    "running_postgres",
]
