"""How a collection stores its vectors (its `storage`), spelt in SQL once for the partition, the writer and search.

- float32: `embedding vector`; the HNSW index over it (or over a halfvec cast of it: HnswOptions.halfvec).
- float16: `embedding_half halfvec` only, half the bytes; the index is over that column, and the exact rerank
  is on the stored half-precision values widened to float32.
- binary: `embedding_bits bit(dim)` (pgvector's binary_quantize: 1 where a component is > 0) for a Hamming
  HNSW index, plus `embedding` kept for the exact float rerank of the Hamming candidates. It costs more bytes
  than float32 alone; what it saves is index memory and graph-walk work (1 bit a component in the index).

The writer COPYs float32 vectors (rust/copy.rs) into its staging table for every storage; the conversion to
halfvec or bits happens in the INSERT from there (`insert_columns`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from psycopg import sql

from embedpool.errors import InvalidArgument

__all__ = ["DEFAULT", "STORAGES", "Storage", "check"]


@dataclass(frozen=True, slots=True)
class Storage:
    name: str
    column: str
    """The column the HNSW index is built over."""
    index_type: str
    """The type of the index expression: vector, halfvec or bit."""
    float_value: str
    """The stored vector as float32 `vector`, for exact distances and for returning it."""
    stored: str
    """The partition's check of which columns a row fills ({dim}: the collection's)."""
    dim_check: str
    insert: tuple[str, str, str]
    """What the INSERT from the staging table (float32 `embedding`) writes into (embedding, embedding_half,
    embedding_bits)."""


STORAGES: Final = {
    "float32": Storage(
        "float32",
        column="embedding",
        index_type="vector",
        float_value="embedding",
        stored="embedding IS NOT NULL AND embedding_half IS NULL AND embedding_bits IS NULL",
        dim_check="vector_dims(embedding) = {dim}",
        insert=("embedding", "NULL", "NULL"),
    ),
    "float16": Storage(
        "float16",
        column="embedding_half",
        index_type="halfvec",
        float_value="embedding_half::vector",
        stored="embedding IS NULL AND embedding_half IS NOT NULL AND embedding_bits IS NULL",
        dim_check="vector_dims(embedding_half) = {dim}",
        insert=("NULL", "embedding::halfvec", "NULL"),
    ),
    "binary": Storage(
        "binary",
        column="embedding_bits",
        index_type="bit",
        float_value="embedding",
        stored="embedding IS NOT NULL AND embedding_half IS NULL AND length(embedding_bits) IS NOT DISTINCT FROM {dim}",
        dim_check="vector_dims(embedding) = {dim}",
        insert=("embedding", "NULL", "binary_quantize(embedding)"),
    ),
}
DEFAULT: Final = "float32"


def check(storage: object, field: str = "storage") -> Storage:
    if not isinstance(storage, str) or storage not in STORAGES:
        raise InvalidArgument(f"{field} must be one of {', '.join(STORAGES)}, got {storage!r}")
    return STORAGES[storage]


def constraints(storage: Storage, dim: int) -> sql.Composed:
    """The partition's CHECK constraints (named as migration 0007 expects them)."""
    return sql.SQL("CONSTRAINT embedding_dim CHECK ({}), CONSTRAINT embedding_stored CHECK ({})").format(
        sql.SQL(storage.dim_check.format(dim=int(dim))), sql.SQL(storage.stored.format(dim=int(dim)))
    )


def insert_values(storage: Storage) -> sql.Composed:
    """The SELECT list from the staging table that fills (embedding, embedding_half, embedding_bits)."""
    return sql.SQL(", ").join(sql.SQL(value) for value in storage.insert)
