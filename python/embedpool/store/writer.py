"""Writes: validated rows -> one binary COPY -> the collection's partition, in one transaction.

A retried batch leaves the store as if it ran once. The stored content hashes of the batch's ids are read
first: unchanged rows are not encoded or sent at all, and a batch of only new ids is copied straight into the
partition. A batch that changes stored rows is copied into a session-private staging table (TEMP, no
index) and merged with `INSERT .. ON CONFLICT DO UPDATE .. WHERE content_hash IS DISTINCT FROM`, which also
settles a race with a concurrent writer. Nothing of a failed batch is visible: every step shares the
transaction.

The COPY stream is built in bulk, not row by row through psycopg's adapters: rust/copy.rs writes the whole
batch from the stacked vectors and the column lists. The checks before it are batch-wide too (one numpy
stack, one json call for all the metadata, one native pass over the ids and texts); a batch with a fault
is gone through again row by row only to say which rows and why. Interpreted work per row would otherwise
be a large share of what Postgres spends storing the row (bench/writer.py measures both).
"""

from __future__ import annotations

import itertools
import json
import operator
import re
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import numpy as np
import psycopg
from numpy.typing import NDArray
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from embedpool import _native
from embedpool.errors import InvalidArgument
from embedpool.store import collections
from embedpool.store import storage as storages
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
    texts: list[str]
    metadata: list[str]
    """JSON text."""
    hashes: list[bytes]
    vectors: NDArray[np.float32]
    """The screened batch's matrix, [input rows, dim]: the encoder picks the rows, so no copy in id order. A view
    of the caller's matrix when the rows' embeddings are its consecutive rows (no copy either): the caller leaves
    them unchanged until the write returns, as the service does (each embedded batch is a fresh array)."""
    rows: NDArray[np.int64]
    """The row of `vectors` of each id."""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def embeddings(self) -> NDArray[np.float32]:
        """[len, dim]: the ids' vectors, copied out in order."""
        return self.vectors[self.rows]


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

    last: dict[str, int]
    """Input position of each id's last screened row."""
    ids: list[str]
    digests: list[bytes]
    """As given: only those at usable positions are checked."""
    matrix: NDArray[np.float32]
    """One row per input position (rejected ones included: cheaper than picking the usable ones)."""
    usable: NDArray[np.bool_]
    rejected: dict[int, tuple[str, str]]


def _screen(rows: Sequence[DocumentRow], info: CollectionInfo) -> _Screened:
    ids = [row.id for row in rows]
    digests = [row.content_hash for row in rows]
    faults = set(_native.text_faults(ids, min_bytes=1, max_bytes=MAX_ID_BYTES))
    if not all(map(isinstance, digests, itertools.repeat(bytes))):
        faults.update(n for n, digest in enumerate(digests) if not isinstance(digest, bytes))
    rejected: dict[int, tuple[str, str]] = {}
    for n in faults:
        rejected[n] = (_shown(ids[n]), _id_or_hash_fault(ids[n], digests[n]))
    matrix, unusable = _stacked([row.embedding for row in rows], info.dim)
    rejected.update((n, (_shown(ids[n]), why)) for n, why in unusable.items() if n not in rejected)
    # Value checks in one native pass over the stacked batch (per-row numpy calls would cost more than the
    # COPY itself). Values beyond float32 range became infinite in the cast and are refused with the NaNs.
    bad = _native.vector_faults(matrix, cosine=info.metric == "cosine", float16=info.storage == "float16")
    for n, code in bad:
        if n not in rejected:
            rejected[n] = (_shown(ids[n]), _VECTOR_FAULTS[code])
    usable = np.ones(len(rows), bool)
    usable[list(rejected)] = False
    last = {ids[n]: n for n in np.flatnonzero(usable).tolist()} if rejected else _last_positions(ids)
    return _Screened(last, ids, digests, matrix, usable, rejected)


_TEXT = operator.attrgetter("text")
_METADATA = operator.attrgetter("metadata")
_METADATA_JSON = operator.attrgetter("metadata_json")
# _native.vector_faults' codes.
_VECTOR_FAULTS: Final = {
    1: "embedding has a NaN or infinite value (or one beyond float32 range)",
    2: "embedding has a value beyond float16 range (65504): the collection stores float16",
    3: "embedding is all zeros: it has no cosine direction",
}


def _last_positions(ids: list[str]) -> dict[str, int]:
    """Each id's last position: a dict built from (id, position) pairs keeps the last one given."""
    return dict(zip(ids, range(len(ids)), strict=True))


def _shown(doc_id: object) -> str:
    return doc_id if isinstance(doc_id, str) else repr(doc_id)


def _id_or_hash_fault(doc_id: object, digest: object) -> str:
    try:
        if not 1 <= len(_utf8(doc_id, "id")) <= MAX_ID_BYTES:
            raise InvalidArgument(f"id must be 1..{MAX_ID_BYTES} bytes of UTF-8")
        if not isinstance(digest, bytes):
            raise InvalidArgument("content_hash must be bytes")
    except InvalidArgument as e:
        return str(e)
    raise AssertionError(f"id {doc_id!r} and its hash were flagged but pass")


def _stacked(values: list[object], dim: int) -> tuple[NDArray[np.float32], dict[int, str]]:
    """The embeddings as one float32 matrix, and why each position that is not an embedding is not (its matrix
    row is zeros). One native or numpy call when every value is an array of numbers of the right shape."""
    native = _native.stack_vectors(values, dim)
    if native is not None:
        return native, {}
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            stacked = np.stack(cast(list[NDArray[Any]], values)) if values else None
        except (TypeError, ValueError):
            stacked = None
        if stacked is not None and stacked.dtype.kind in "fiu" and stacked.shape == (len(values), dim):
            return stacked.astype(np.float32), {}
        if not values:
            return np.empty((0, dim), np.float32), {}
        rows: list[NDArray[Any]] = []
        faults: dict[int, str] = {}
        for n, value in enumerate(values):
            try:
                rows.append(_embedding(value, dim))
            except InvalidArgument as e:
                faults[n] = str(e)
                rows.append(np.zeros(dim, np.float32))
        return np.stack(rows).astype(np.float32), faults


def _select(
    rows: Sequence[DocumentRow], screened: _Screened, stored: dict[str, bytes]
) -> tuple[Batch, int, list[tuple[str, str]]]:
    """The rows to write, the count of unchanged ids, and the rejected rows in input order.

    Per id, the last row that passes validation wins; a row whose hash is the stored one is unchanged, and
    its text and metadata are not even checked (the hash covers them, and they were valid when stored).
    Ids come out in id order, so concurrent writers lock rows in the same order (no deadlock); UTF-8 byte
    order is code point order, the same for every writer."""
    rejected = dict(screened.rejected)
    ids, digests = screened.ids, screened.digests
    order = sorted(screened.last)
    # map() over C-level getters: these run once per row, and an interpreted loop would cost more.
    kept = list(map(screened.last.__getitem__, order))
    if stored:
        kept = [n for doc_id, n in zip(order, kept, strict=True) if stored.get(doc_id) != digests[n]]
    unchanged = len(order) - len(kept)
    kept_rows = list(map(rows.__getitem__, kept))
    texts: list[str] = list(map(_TEXT, kept_rows))
    encoded: list[str | None] = list(map(_METADATA_JSON, kept_rows))
    if None in encoded:
        metadata, faults = _metadata(list(map(_METADATA, kept_rows)))
    else:  # encoded by the caller already (the service, for the content hash)
        metadata, faults = cast(list[str], encoded), {}
    for k in _native.text_faults(texts):
        faults[k] = _text_fault(texts[k])
    if faults:  # fall back to the id's earlier rows, newest first
        positions = _positions(screened)
        for k in sorted(faults, reverse=True):
            n = kept[k]
            doc_id = ids[n]
            rejected[n] = (doc_id, faults[k])
            del kept[k], texts[k], metadata[k]
            for m in reversed(positions[doc_id][:-1]):
                if stored.get(doc_id) == digests[m]:
                    unchanged += 1
                    break
                try:
                    earlier = (_checked_text(rows[m].text), json_object(rows[m].metadata, "metadata"))
                except InvalidArgument as e:
                    rejected[m] = (doc_id, str(e))
                else:
                    kept.insert(k, m)
                    texts.insert(k, earlier[0])
                    metadata.insert(k, earlier[1])
                    break
    batch = Batch(
        list(map(ids.__getitem__, kept)),
        texts,
        metadata,
        list(map(digests.__getitem__, kept)),
        screened.matrix,
        np.asarray(kept, dtype=np.int64),
    )
    return batch, unchanged, [rejected[n] for n in sorted(rejected)]


def _positions(screened: _Screened) -> dict[str, list[int]]:
    positions: dict[str, list[int]] = {}
    for n in np.flatnonzero(screened.usable).tolist():
        positions.setdefault(screened.ids[n], []).append(n)
    return positions


def _text_fault(value: object) -> str:
    try:
        _checked_text(value)
    except InvalidArgument as e:
        return str(e)
    raise AssertionError("a text was flagged but passes")


def _checked_text(value: object) -> str:
    _utf8(value, "text")
    return cast(str, value)


def _metadata(values: list[object]) -> tuple[list[str], dict[int, str]]:
    """Each value as JSON text for jsonb ("" where it cannot be), and why not by position. One json call
    encodes the whole batch (a call per row costs more than the COPY); a batch with a fault is redone row by
    row to say which."""
    try:
        array = _JSON.encode(values)
        array.encode()
        if "\\u0000" in array and _JSON_NUL.search(array):
            raise ValueError("a NUL character")
        items = _native.json_array_items(array)
        if len(items) == len(values) and all(map(str.startswith, items, itertools.repeat("{"))):
            return items, {}
    except (TypeError, ValueError):
        pass
    texts: list[str] = []
    faults: dict[int, str] = {}
    for k, value in enumerate(values):
        try:
            texts.append(json_object(value, "metadata"))
        except InvalidArgument as e:
            texts.append("")
            faults[k] = str(e)
    return texts, faults


def validate(rows: Sequence[DocumentRow], info: CollectionInfo) -> tuple[Batch, list[tuple[str, str]]]:
    """The rows ready for COPY (as if none were stored), and (id, reason) for each row that is not."""
    batch, _, rejected = _select(rows, _screen(rows, info), {})
    return batch, rejected


# The column order of both COPY targets (rust/copy.rs writes the rows in it).
_COLUMNS = ("collection_id", "embedding", "id", "text", "metadata", "content_hash")
# Rows per COPY chunk: a few hundred kilobytes of 384-d rows, big enough that a call per chunk costs nothing.
_CHUNK_ROWS: Final = 128


def copy_chunks(first: int | NDArray[np.int64], batch: Batch) -> Iterator[bytes]:
    """The binary COPY data of `batch` in chunks of whole rows, with `first` (one value, or one per row) as the
    int8 first column. Each chunk is encoded when it is asked for: Postgres parses one while the next is
    encoded and sent."""
    n = len(batch)
    for start in range(0, max(n, 1), _CHUNK_ROWS):
        end = min(start + _CHUNK_ROWS, n)
        yield from _native.copy_binary(
            first if isinstance(first, int) else first[start:end],
            batch.vectors,
            batch.ids[start:end],
            batch.texts[start:end],
            batch.metadata[start:end],
            batch.hashes[start:end],
            rows=batch.rows[start:end],
            chunk_rows=_CHUNK_ROWS,
            signature=start == 0,
            trailer=end == n,
        )


async def _copy(conn: AsyncConnection[Any], table: sql.Composable, chunks: Iterable[bytes]) -> None:
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
# The vector columns are filled from the staged float32 `embedding` as the collection's storage keeps them
# (store.storage): halfvec and bits are converted here, so the COPY stream is the same for every storage.
_MERGE = """
WITH written AS (
    INSERT INTO {partition} AS d
        (collection_id, id, text, metadata, content_hash, embedding, embedding_half, embedding_bits)
    SELECT %s::int8, id, text, metadata, content_hash, {vectors} FROM upsert_staging ORDER BY collection_id
    ON CONFLICT (collection_id, id) DO UPDATE
       SET text = EXCLUDED.text, metadata = EXCLUDED.metadata, content_hash = EXCLUDED.content_hash,
           embedding = EXCLUDED.embedding, embedding_half = EXCLUDED.embedding_half,
           embedding_bits = EXCLUDED.embedding_bits, updated_at = now()
     WHERE d.content_hash IS DISTINCT FROM EXCLUDED.content_hash
    RETURNING old.id IS NULL AS inserted)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM written
"""


async def upsert(
    conn: AsyncConnection[Any],
    info: CollectionInfo,
    rows: Sequence[DocumentRow],
    assumed: Mapping[str, bytes] | None = None,
    *,
    absent: bool = False,
    remove: Sequence[str] = (),
) -> UpsertResult:
    """Store the valid `rows` in `info`'s collection in one transaction, and delete the ids in `remove` in it
    (the windows a document's earlier, longer version left: no one sees the two versions mixed).

    `assumed`: ids the caller did not embed because their stored hash was the given one when it looked; they are
    confirmed in the same transaction, and if any changed since, StaleAssumption is raised with nothing written.
    Confirmed ids count as unchanged.
    `absent`: the caller read the stored hashes of the rows' ids (to skip embedding unchanged ones) and found
    none: they are not read again, the rows are copied straight in (one COPY, no explicit transaction, where
    nothing else is asked), and one stored since is caught by the primary key and the batch merged instead.

    `info` may come from a cache: collection rows never change, and a dropped collection's partition is gone
    (psycopg.errors.UndefinedTable, for the caller to look it up again). The partition's own lock, taken by the
    first statement that touches it, makes a concurrent drop wait for this transaction."""
    if conn not in _with_staging:
        await conn.execute(_STAGING)
        _with_staging.add(conn)
    assumed = assumed or {}
    remove = checked_ids(remove)
    try:
        return await _upsert(conn, info, rows, assumed, merge=False, absent=absent, remove=remove)
    except psycopg.errors.UniqueViolation:
        # A concurrent writer stored one of our new ids between our read and our COPY: merge instead.
        return await _upsert(conn, info, rows, assumed, merge=True, absent=False, remove=remove)


async def _upsert(
    conn: AsyncConnection[Any],
    info: CollectionInfo,
    rows: Sequence[DocumentRow],
    assumed: Mapping[str, bytes],
    *,
    merge: bool,
    absent: bool,
    remove: list[str],
) -> UpsertResult:
    if absent and not merge and not assumed and not remove and info.storage == storages.DEFAULT:
        # Nothing to read or confirm first, and the rows go straight into the partition: the one COPY is the
        # whole write, atomic as any statement is on its own, without BEGIN and COMMIT round trips.
        return await _write(conn, info, rows, assumed, merge=False, absent=True)
    async with conn.transaction():
        result = await _write(conn, info, rows, assumed, merge=merge, absent=absent)
        if remove:  # after the rows: their locks are taken in id order first, as every writer takes them
            await conn.execute(
                "DELETE FROM documents WHERE collection_id = %s::int8 AND id = ANY(%s)", (info.id, remove)
            )
        return result


async def _write(
    conn: AsyncConnection[Any],
    info: CollectionInfo,
    rows: Sequence[DocumentRow],
    assumed: Mapping[str, bytes],
    *,
    merge: bool,
    absent: bool,
) -> UpsertResult:
    """`_upsert`'s rows, in its transaction (or in none, where the write is one statement)."""
    screened = _screen(rows, info)
    only_assumed = {i: h for i, h in assumed.items() if i not in screened.last}
    wanted = [*only_assumed] if absent else [*screened.last, *only_assumed]
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
    # Straight into the partition only where it stores the float32 vectors the COPY stream carries.
    direct = info.storage == storages.DEFAULT
    if direct and not merge and not any(doc_id in stored for doc_id in todo.ids):
        await _copy(conn, partition, copy_chunks(info.id, todo))
        return UpsertResult(inserted=len(todo), unchanged=unchanged, rejected=rejected)
    await _copy(conn, sql.Identifier("upsert_staging"), copy_chunks(np.arange(len(todo), dtype=np.int64), todo))
    vectors = storages.insert_values(storages.check(info.storage))
    cur = await conn.execute(sql.SQL(_MERGE).format(partition=partition, vectors=vectors), (info.id,))
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


async def ids_after(conn: AsyncConnection[Any], collection: str, after: str | None, limit: int) -> list[str]:
    """Up to `limit` of the collection's ids, in id order, after `after` (from the start when None)."""
    info = await collections.lookup(conn, collection)
    cur = await conn.execute(
        sql.SQL("SELECT id FROM {} WHERE collection_id = %s::int8 AND id > %s ORDER BY id LIMIT %s").format(
            sql.Identifier(collections.partition_name(info))
        ),
        (info.id, after if after is not None else "", limit),
    )
    return [doc_id for (doc_id,) in await cur.fetchall()]


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
