"""Writes: validated rows -> one binary COPY -> the collection's partition, in one transaction.

A retried batch leaves the store as if it ran once. The stored content hashes of the batch's ids are read
first: unchanged rows are not encoded or sent at all, and a batch of only new ids is copied straight into the
partition. A batch that changes stored rows is copied into a session-private staging table (TEMP, no
index) and merged with `INSERT .. ON CONFLICT DO UPDATE .. WHERE content_hash IS DISTINCT FROM`, which also
settles a race with a concurrent writer. Nothing of a failed batch is visible: every step shares the
transaction.

The COPY stream is built here, in bulk, rather than row by row through psycopg's adapters: the vectors of
the whole batch are converted to the wire format by one numpy cast, and each row adds only its four
variable-length fields. At 384 dimensions that is several times faster than `Copy.write_row`.
"""

from __future__ import annotations

import functools
import json
import re
import struct
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import numpy as np
import psycopg
from numpy.typing import NDArray
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from embedpool.errors import InvalidArgument
from embedpool.store import collections
from embedpool.store.records import CollectionInfo, DocumentRow, UpsertResult

__all__ = [
    "MAX_ID_BYTES",
    "Batch",
    "StaleAssumption",
    "checked_ids",
    "copy_chunks",
    "delete",
    "delete_where",
    "hashes",
    "json_object",
    "upsert",
    "validate",
]

MAX_ID_BYTES: Final = 512
# jsonb cannot hold U+0000; json.dumps writes it as \u0000 (an escaped backslash before "u0000" is not one).
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# One encoder for every call: json.dumps with options builds a new JSONEncoder each time.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class StaleAssumption(Exception):  # not an error: a signal to embed these and try again
    """Ids the caller assumed unchanged (their stored hash was its own when it looked) whose stored hash has
    changed since: nothing was written; embed them and upsert again."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(f"{len(ids)} ids changed since their hashes were read")
        self.ids = ids


@dataclass(frozen=True, slots=True)
class Batch:
    """Validated rows, column-wise, one row per id (the last of a repeated id), in id order."""

    ids: list[str]
    id_bytes: list[bytes]
    texts: list[bytes]
    metadata: list[bytes]
    """JSON text, UTF-8."""
    hashes: list[bytes]
    embeddings: NDArray[np.float32]
    """[rows, dim]"""

    def __len__(self) -> int:
        return len(self.ids)


def json_object(value: object, what: str) -> str:
    """`value` as JSON text that jsonb accepts; InvalidArgument saying why not."""
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    try:
        text = _JSON.encode(value)
        text.encode()
    except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
        raise InvalidArgument(f"{what} is not JSON-serializable: {e}") from None
    if "\\u0000" in text and _JSON_NUL.search(text):
        raise InvalidArgument(f"{what} contains a NUL character")
    return text


def _utf8(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    try:
        encoded = value.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} is not valid Unicode (lone surrogate)") from None
    if b"\x00" in encoded:
        raise InvalidArgument(f"{what} contains a NUL character")
    return encoded


def _embedding(value: object, dim: int) -> NDArray[Any]:
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiu" and value.shape == (dim,):
        return value  # the common case: no conversion per row, the batch is cast at once
    try:
        embedding = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidArgument("embedding is not an array of numbers") from None
    if embedding.shape != (dim,):
        raise InvalidArgument(f"embedding has shape {embedding.shape}, collection dim is {dim}")
    return embedding


@dataclass(frozen=True, slots=True)
class _Screened:
    """Rows that passed the checks the stored hashes are looked up with: id, hash and embedding."""

    positions: dict[str, list[int]]
    """Input positions of each id's screened rows, in input order."""
    id_bytes: dict[int, bytes]
    vectors: dict[int, int]
    """Input position -> row of `matrix`."""
    matrix: NDArray[np.float32]
    rejected: dict[int, tuple[str, str]]


def _screen(rows: Sequence[DocumentRow], info: CollectionInfo) -> _Screened:
    positions: dict[str, list[int]] = {}
    id_bytes: dict[int, bytes] = {}
    embeddings: list[NDArray[Any]] = []
    ok: list[int] = []
    rejected: dict[int, tuple[str, str]] = {}
    for n, row in enumerate(rows):
        try:
            encoded = _utf8(row.id, "id")
            if not 1 <= len(encoded) <= MAX_ID_BYTES:
                raise InvalidArgument(f"id must be 1..{MAX_ID_BYTES} bytes of UTF-8")
            if not isinstance(row.content_hash, bytes):
                raise InvalidArgument("content_hash must be bytes")
            embeddings.append(_embedding(row.embedding, info.dim))
        except InvalidArgument as e:
            rejected[n] = (row.id if isinstance(row.id, str) else repr(row.id), str(e))
        else:
            id_bytes[n] = encoded
            ok.append(n)
    # Value checks on the stacked batch: per-row numpy calls would cost more than the COPY itself. Values
    # beyond float32 range become infinite in the cast and are refused with the NaNs.
    with np.errstate(over="ignore", invalid="ignore"):
        matrix = np.stack(embeddings).astype(np.float32) if ok else np.empty((0, info.dim), np.float32)
    finite = cast(NDArray[np.bool_], np.isfinite(matrix).all(axis=1))
    nonzero = cast(NDArray[np.bool_], matrix.any(axis=1)) if info.metric == "cosine" else np.ones(len(ok), bool)
    usable = finite & nonzero
    for k, n in enumerate(ok):
        if usable[k]:
            positions.setdefault(rows[n].id, []).append(n)
        elif finite[k]:
            rejected[n] = (rows[n].id, "embedding is all zeros: it has no cosine direction")
        else:
            rejected[n] = (rows[n].id, "embedding has a NaN or infinite value (or one beyond float32 range)")
    return _Screened(positions, id_bytes, {n: k for k, n in enumerate(ok)}, matrix, rejected)


def _select(
    rows: Sequence[DocumentRow], screened: _Screened, stored: dict[str, bytes]
) -> tuple[Batch, int, list[tuple[str, str]]]:
    """The rows to write, the count of unchanged ids, and the rejected rows in input order.

    Per id, the last row that passes validation wins; a row whose hash is the stored one is unchanged, and
    its text and metadata are not even encoded (the hash covers them, and they were valid when stored).
    Ids come out in id order, so concurrent writers lock rows in the same order (no deadlock); UTF-8 byte
    order is code point order, the same for every writer."""
    rejected = dict(screened.rejected)
    keep: list[tuple[int, bytes, bytes]] = []
    unchanged = 0
    for doc_id in sorted(screened.positions):
        for n in reversed(screened.positions[doc_id]):
            row = rows[n]
            if stored.get(doc_id) == row.content_hash:
                unchanged += 1
                break
            try:
                keep.append((n, _utf8(row.text, "text"), json_object(row.metadata, "metadata").encode()))
                break
            except InvalidArgument as e:
                rejected[n] = (doc_id, str(e))
    batch = Batch(
        [rows[n].id for n, _, _ in keep],
        [screened.id_bytes[n] for n, _, _ in keep],
        [text for _, text, _ in keep],
        [metadata for _, _, metadata in keep],
        [rows[n].content_hash for n, _, _ in keep],
        screened.matrix[np.asarray([screened.vectors[n] for n, _, _ in keep], dtype=np.intp)],
    )
    return batch, unchanged, [rejected[n] for n in sorted(rejected)]


def validate(rows: Sequence[DocumentRow], info: CollectionInfo) -> tuple[Batch, list[tuple[str, str]]]:
    """The rows ready for COPY (as if none were stored), and (id, reason) for each row that is not."""
    batch, _, rejected = _select(rows, _screen(rows, info), {})
    return batch, rejected


_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_TRAILER = struct.pack(">h", -1)
_LENGTH = struct.Struct(">i").pack
_JSONB_VERSION = b"\x01"
# The column order of both COPY targets: the fixed-width head of each row comes out of one numpy array.
_COLUMNS = ("collection_id", "embedding", "id", "text", "metadata", "content_hash")


_CHUNK_ROWS: Final = 128  # ~200 kB at 384 dimensions: the socket buffer holds one while the next is encoded


def copy_chunks(first: int | NDArray[np.int64], batch: Batch) -> Iterator[bytearray]:
    """The binary COPY data of `batch` in chunks, with `first` (one value, or one per row) as the int8 first
    column. A generator, so that Postgres parses one chunk while the next is built."""
    n, dim = batch.embeddings.shape
    head = np.empty(n, dtype=_head_dtype(dim))
    head["fields"], head["first_len"], head["first"] = len(_COLUMNS), 8, first
    head["vector_len"], head["dim"], head["unused"] = 4 + 4 * dim, dim, 0
    head["vector"] = batch.embeddings
    heads, size = head.view(np.uint8).data, head.dtype.itemsize
    columns = zip(batch.id_bytes, batch.texts, batch.metadata, batch.hashes, strict=True)
    out = bytearray(_SIGNATURE)
    for k, (id_bytes, text, metadata, digest) in enumerate(columns):
        out += heads[k * size : (k + 1) * size]
        out += _LENGTH(len(id_bytes))
        out += id_bytes
        out += _LENGTH(len(text))
        out += text
        out += _LENGTH(len(metadata) + 1)
        out += _JSONB_VERSION
        out += metadata
        out += _LENGTH(len(digest))
        out += digest
        if k % _CHUNK_ROWS == _CHUNK_ROWS - 1:
            yield out
            out = bytearray()
    out += _TRAILER
    yield out


@functools.cache
def _head_dtype(dim: int) -> np.dtype[np.void]:
    """The fixed-width start of a row: field count, the int8 first column, the vector (pgvector's binary
    format: uint16 dim, uint16 unused, big-endian float32 values)."""
    return np.dtype(
        [
            ("fields", ">i2"),
            ("first_len", ">i4"),
            ("first", ">i8"),
            ("vector_len", ">i4"),
            ("dim", ">u2"),
            ("unused", ">u2"),
            ("vector", ">f4", (dim,)),
        ]
    )


async def _copy(conn: AsyncConnection[Any], table: sql.Composable, chunks: Iterator[bytearray]) -> None:
    query = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        table, sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
    )
    async with conn.cursor() as cur, cur.copy(query) as copy:
        for chunk in chunks:
            await copy.write(chunk)


# Session-private, created once per connection outside any transaction (so a rollback cannot take it away);
# ON COMMIT DELETE ROWS empties it at the end of each batch. `collection_id` holds the row's position.
_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS upsert_staging (collection_id int8, embedding vector, id text, text text,"
    " metadata jsonb, content_hash bytea) ON COMMIT DELETE ROWS"
)
_with_staging: weakref.WeakSet[AsyncConnection[Any]] = weakref.WeakSet()
# `old` (PostgreSQL 18) is NULL for an inserted row; an unchanged row is filtered by the WHERE and not returned.
_MERGE = """
WITH written AS (
    INSERT INTO {partition} AS d (collection_id, id, text, metadata, content_hash, embedding)
    SELECT %s::int8, id, text, metadata, content_hash, embedding FROM upsert_staging ORDER BY collection_id
    ON CONFLICT (collection_id, id) DO UPDATE
       SET text = EXCLUDED.text, metadata = EXCLUDED.metadata, content_hash = EXCLUDED.content_hash,
           embedding = EXCLUDED.embedding, updated_at = now()
     WHERE d.content_hash IS DISTINCT FROM EXCLUDED.content_hash
    RETURNING old.id IS NULL AS inserted)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM written
"""


async def upsert(
    conn: AsyncConnection[Any],
    collection: str,
    rows: Sequence[DocumentRow],
    assumed: Mapping[str, bytes] | None = None,
) -> UpsertResult:
    """Store the valid `rows` in one transaction. `assumed`: ids the caller did not embed because their stored
    hash was the given one when it looked; they are confirmed in the same transaction, and if any changed
    since, StaleAssumption is raised with nothing written. Confirmed ids count as unchanged."""
    if conn not in _with_staging:
        await conn.execute(_STAGING)
        _with_staging.add(conn)
    assumed = assumed or {}
    try:
        return await _upsert(conn, collection, rows, assumed, merge=False)
    except psycopg.errors.UniqueViolation:
        # A concurrent writer stored one of our new ids between our read and our COPY: merge instead.
        return await _upsert(conn, collection, rows, assumed, merge=True)


async def _upsert(
    conn: AsyncConnection[Any],
    collection: str,
    rows: Sequence[DocumentRow],
    assumed: Mapping[str, bytes],
    *,
    merge: bool,
) -> UpsertResult:
    async with conn.transaction():
        info = await collections.lookup(conn, collection, lock=True)
        screened = _screen(rows, info)
        only_assumed = {i: h for i, h in assumed.items() if i not in screened.positions}
        wanted = [*screened.positions, *only_assumed]
        # One read serves both: the hashes that make rows unchanged, and the confirmation of the assumed ones.
        # Read after earlier writes of the same ids committed (the caller orders them), so a stale assumption
        # is seen here rather than overwriting a newer row with the older one's "unchanged".
        stored = await hashes(conn, info, wanted) if wanted else {}
        stale = [i for i, h in only_assumed.items() if stored.get(i) != h]
        if stale:
            raise StaleAssumption(sorted(stale))
        todo, unchanged, rejected = _select(rows, screened, stored)
        unchanged += len(only_assumed)
        if not todo:
            return UpsertResult(unchanged=unchanged, rejected=rejected)
        partition = sql.Identifier(collections.partition_name(info))
        if not merge and not any(doc_id in stored for doc_id in todo.ids):
            await _copy(conn, partition, copy_chunks(info.id, todo))
            return UpsertResult(inserted=len(todo), unchanged=unchanged, rejected=rejected)
        await _copy(conn, sql.Identifier("upsert_staging"), copy_chunks(np.arange(len(todo), dtype=np.int64), todo))
        cur = await conn.execute(sql.SQL(_MERGE).format(partition=partition), (info.id,))
        counts = await cur.fetchone()
        assert counts is not None
        inserted, updated = counts
        return UpsertResult(inserted, updated, unchanged + len(todo) - inserted - updated, rejected)


async def hashes(conn: AsyncConnection[Any], info: CollectionInfo, ids: list[str]) -> dict[str, bytes]:
    """Content hash of each of `ids` that is stored: lets the caller skip embedding unchanged documents."""
    cur = await conn.execute(
        sql.SQL("SELECT id, content_hash FROM {} WHERE collection_id = %s::int8 AND id = ANY(%s::text[])").format(
            sql.Identifier(collections.partition_name(info))
        ),
        (info.id, ids),
        binary=True,
    )
    return {doc_id: bytes(digest) for doc_id, digest in await cur.fetchall()}


def checked_ids(ids: Sequence[str]) -> list[str]:
    if isinstance(ids, str):
        raise InvalidArgument("ids must be a sequence of strings, not one string")
    for i in ids:
        _utf8(i, "id")
    return list(ids)


async def delete(conn: AsyncConnection[Any], collection: str, ids: Sequence[str]) -> int:
    info = await collections.lookup(conn, collection)
    cur = await conn.execute(
        "DELETE FROM documents WHERE collection_id = %s::int8 AND id = ANY(%s)", (info.id, checked_ids(ids))
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
