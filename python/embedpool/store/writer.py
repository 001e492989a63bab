"""Writes: validated rows -> binary COPY into a temp table -> one INSERT .. ON CONFLICT, in one transaction.

A retried batch leaves the store as if it ran once: rows whose content hash is unchanged are not touched,
and nothing of a failed batch is visible (the COPY and the INSERT share the transaction).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import numpy as np
from numpy.typing import NDArray
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from embedpool.errors import InvalidArgument
from embedpool.store import collections
from embedpool.store.records import CollectionInfo, DocumentRow, UpsertResult

__all__ = ["MAX_ID_BYTES", "delete", "delete_where", "existing_hashes", "json_object", "upsert", "validate"]

MAX_ID_BYTES: Final = 512
# jsonb cannot hold U+0000; json.dumps writes it as \u0000 (an escaped backslash before "u0000" is not one).
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


@dataclass(frozen=True, slots=True)
class _Staged:
    id: str
    text: str
    metadata_json: str
    content_hash: bytes
    embedding: NDArray[np.float32]


def json_object(value: object, what: str) -> str:
    """`value` as JSON text that jsonb accepts; InvalidArgument saying why not."""
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode()
    except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
        raise InvalidArgument(f"{what} is not JSON-serializable: {e}") from None
    if _JSON_NUL.search(text):
        raise InvalidArgument(f"{what} contains a NUL character")
    return text


def _check_string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidArgument(f"{what} contains a NUL character")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} is not valid Unicode (lone surrogate)") from None
    return value


def _check_row(row: DocumentRow, dim: int) -> tuple[str, NDArray[np.float32]]:
    """The row's metadata as JSON and its embedding as float32 of the right shape; values are checked batch-wise."""
    doc_id = _check_string(row.id, "id")
    if not 1 <= len(doc_id.encode()) <= MAX_ID_BYTES:
        raise InvalidArgument(f"id must be 1..{MAX_ID_BYTES} bytes of UTF-8")
    _check_string(row.text, "text")
    if not isinstance(row.content_hash, bytes):
        raise InvalidArgument("content_hash must be bytes")
    try:
        embedding = np.asarray(row.embedding, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidArgument("embedding is not an array of numbers") from None
    if embedding.shape != (dim,):
        raise InvalidArgument(f"embedding has shape {embedding.shape}, collection dim is {dim}")
    return json_object(row.metadata, "metadata"), embedding


def validate(rows: Sequence[DocumentRow], info: CollectionInfo) -> tuple[list[_Staged], list[tuple[str, str]]]:
    """Rows ready for COPY, and (id, reason) for each row that is not, in input order."""
    checked: list[tuple[int, DocumentRow, str, NDArray[np.float32]]] = []
    rejected: dict[int, tuple[str, str]] = {}
    for n, row in enumerate(rows):
        try:
            checked.append((n, row, *_check_row(row, info.dim)))
        except InvalidArgument as e:
            rejected[n] = (row.id if isinstance(row.id, str) else repr(row.id), str(e))
    # Value checks on the stacked batch: per-row numpy calls would cost more than the COPY itself.
    matrix = np.stack([c[3] for c in checked]) if checked else np.empty((0, info.dim), np.float32)
    finite = cast(list[bool], np.isfinite(matrix).all(axis=1).tolist())
    nonzero = cast(list[bool], matrix.any(axis=1).tolist()) if info.metric == "cosine" else [True] * len(checked)
    staged = []
    for (n, row, metadata_json, embedding), ok, nz in zip(checked, finite, nonzero, strict=True):
        if not ok:
            rejected[n] = (row.id, "embedding has a NaN or infinite value (or one beyond float32 range)")
        elif not nz:
            rejected[n] = (row.id, "embedding is all zeros: it has no cosine direction")
        else:
            staged.append(_Staged(row.id, row.text, metadata_json, row.content_hash, embedding))
    return staged, [rejected[n] for n in sorted(rejected)]


_STAGING = (
    "CREATE TEMP TABLE upsert_staging"
    " (ord int4, id text, text text, metadata text, content_hash bytea, embedding vector) ON COMMIT DROP"
)
_COPY = "COPY upsert_staging (ord, id, text, metadata, content_hash, embedding) FROM STDIN (FORMAT BINARY)"
_COPY_TYPES = ["int4", "text", "text", "text", "bytea", "vector"]
# DISTINCT ON (id) .. ORDER BY id, ord DESC: the last row of an id in the batch wins, and ON CONFLICT never
# meets one id twice. Rows arrive in id order, so concurrent upserts lock rows in the same order (no deadlock).
# `old` (PostgreSQL 18) is NULL for an inserted row; an unchanged row is filtered by the WHERE and not returned.
_MERGE = """
WITH written AS (
    INSERT INTO documents AS d (collection_id, id, text, metadata, content_hash, embedding)
    SELECT DISTINCT ON (id) %s::int8, id, text, metadata::jsonb, content_hash, embedding
      FROM upsert_staging ORDER BY id, ord DESC
    ON CONFLICT (collection_id, id) DO UPDATE
       SET text = EXCLUDED.text, metadata = EXCLUDED.metadata, content_hash = EXCLUDED.content_hash,
           embedding = EXCLUDED.embedding, updated_at = now()
     WHERE d.content_hash IS DISTINCT FROM EXCLUDED.content_hash
    RETURNING old.id IS NULL AS inserted)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM written
"""


async def upsert(conn: AsyncConnection[Any], collection: str, rows: Sequence[DocumentRow]) -> UpsertResult:
    async with conn.transaction():
        info = await collections.lookup(conn, collection, lock=True)
        staged, rejected = validate(rows, info)
        if not staged:
            return UpsertResult(rejected=rejected)
        await conn.execute(_STAGING)
        async with conn.cursor() as cur, cur.copy(_COPY) as copy:
            copy.set_types(_COPY_TYPES)
            for ord_, s in enumerate(staged):
                await copy.write_row((ord_, s.id, s.text, s.metadata_json, s.content_hash, s.embedding))
        cur = await conn.execute(_MERGE, (info.id,))
        counts = await cur.fetchone()
        assert counts is not None
        inserted, updated = counts
        distinct = len({s.id for s in staged})
        return UpsertResult(inserted, updated, distinct - inserted - updated, rejected)


def _ids(ids: Sequence[str]) -> list[str]:
    if isinstance(ids, str):
        raise InvalidArgument("ids must be a sequence of strings, not one string")
    return [_check_string(i, "id") for i in ids]


async def existing_hashes(conn: AsyncConnection[Any], collection: str, ids: Sequence[str]) -> dict[str, bytes]:
    """Content hash of each of `ids` that is stored: lets the caller skip embedding unchanged documents."""
    info = await collections.lookup(conn, collection)
    cur = await conn.execute(
        "SELECT id, content_hash FROM documents WHERE collection_id = %s::int8 AND id = ANY(%s)",
        (info.id, _ids(ids)),
    )
    return {doc_id: bytes(digest) for doc_id, digest in await cur.fetchall()}


async def delete(conn: AsyncConnection[Any], collection: str, ids: Sequence[str]) -> int:
    info = await collections.lookup(conn, collection)
    cur = await conn.execute(
        "DELETE FROM documents WHERE collection_id = %s::int8 AND id = ANY(%s)", (info.id, _ids(ids))
    )
    return max(cur.rowcount, 0)


async def delete_where(conn: AsyncConnection[Any], collection: str, filter: dict[str, Any]) -> int:
    """Delete the documents whose metadata contains `filter` (jsonb @>); an empty filter is refused."""
    json_object(filter, "filter")
    if not filter:
        raise InvalidArgument("an empty filter would delete every document: use drop_collection")
    info = await collections.lookup(conn, collection)
    cur = await conn.execute(
        "DELETE FROM documents WHERE collection_id = %s::int8 AND metadata @> %s", (info.id, Jsonb(filter))
    )
    return max(cur.rowcount, 0)
