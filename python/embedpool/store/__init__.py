"""Postgres + pgvector storage: migrations, the COPY writer, candidate search, an embedded server."""

from embedpool.store.collections import HnswOptions
from embedpool.store.embedded import EmbeddedPostgres, default_data_dir, running_postgres
from embedpool.store.migrations import migrate_down, migrate_up
from embedpool.store.records import Candidate, CollectionInfo, CollectionStats, DocumentRow, UpsertResult
from embedpool.store.store import Store

__all__ = [
    "Candidate",
    "CollectionInfo",
    "CollectionStats",
    "DocumentRow",
    "EmbeddedPostgres",
    "HnswOptions",
    "Store",
    "UpsertResult",
    "default_data_dir",
    "migrate_down",
    "migrate_up",
    "running_postgres",
]
