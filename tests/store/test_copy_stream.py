"""The writer's batch-wide checks and native COPY stream: a batch is judged as its rows would be one by one, and
what it streams reads back from Postgres exactly (vectors bit for bit)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray
from psycopg import AsyncConnection

from embedpool import _native
from embedpool.store import DocumentRow, EmbeddedPostgres, Store
from embedpool.store.records import CollectionInfo
from embedpool.store.writer import copy_chunks, validate

DIM = 4
INFO = CollectionInfo(42, "c", "m", DIM, "cosine", dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
# Any Unicode Postgres text holds, astral planes included.
TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=10)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(-1e15, 1e15, allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
METADATA = st.dictionaries(TEXT, JSON, max_size=3)
# Numbers of every float32 kind: -0.0, denormals, the largest; cosine needs one nonzero value per row.
FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False) | st.sampled_from([-0.0, 1e-45, -1.4e-45])
VECTOR = hnp.arrays(np.float32, DIM, elements=FLOAT32).filter(lambda v: bool(v.any()))
_V = np.ones(DIM, np.float32)
# What a caller may get wrong, one fault per row; every row here is refused whatever the rest of the batch is.
FAULTY = st.sampled_from(
    [
        DocumentRow("", "t", {}, b"h", _V),
        DocumentRow("x" * 513, "t", {}, b"h", _V),
        DocumentRow("a\x00", "t", {}, b"h", _V),
        DocumentRow("\ud800", "t", {}, b"h", _V),
        DocumentRow(7, "t", {}, b"h", _V),  # type: ignore[arg-type]
        DocumentRow("hash", "t", {}, "not bytes", _V),  # type: ignore[arg-type]
        DocumentRow("dim", "t", {}, b"h", np.ones(DIM + 1, np.float32)),
        DocumentRow("words", "t", {}, b"h", ["a"] * DIM),  # type: ignore[arg-type]
        DocumentRow("nan", "t", {}, b"h", np.full(DIM, np.nan, np.float32)),
        DocumentRow("huge", "t", {}, b"h", np.full(DIM, 1e300)),
        DocumentRow("zero", "t", {}, b"h", np.zeros(DIM, np.float32)),
        DocumentRow("nul-text", "a\x00b", {}, b"h", _V),
        DocumentRow("surrogate-text", "\udcff", {}, b"h", _V),
        DocumentRow("list-meta", "t", [1], b"h", _V),  # type: ignore[arg-type]
        DocumentRow("nan-meta", "t", {"x": float("nan")}, b"h", _V),
        DocumentRow("nul-meta", "t", {"x": "\x00"}, b"h", _V),
        DocumentRow("set-meta", "t", {"x": {1}}, b"h", _V),
        DocumentRow("surrogate-meta", "t", {"\ud800": 1}, b"h", _V),
    ]
)
# Accepted, but not by the native fast path: converted the way a row alone would be.
ODD_VECTOR = st.sampled_from([[1.0, 2.0, 3.0, 4.0], np.arange(1, DIM + 1), np.ones(DIM, ">f4"), np.ones(DIM)])


@st.composite
def good_rows(draw: st.DrawFn) -> DocumentRow:
    embedding: Any = draw(VECTOR | ODD_VECTOR)
    return DocumentRow(draw(TEXT.filter(bool)), draw(TEXT), draw(METADATA), draw(st.binary(max_size=8)), embedding)


def _one_by_one(rows: list[DocumentRow]) -> tuple[dict[str, tuple[str, str, bytes, bytes]], list[tuple[str, str]]]:
    kept: dict[str, tuple[str, str, bytes, bytes]] = {}
    rejected: list[tuple[str, str]] = []
    for row in rows:
        batch, refused = validate([row], INFO)
        rejected += refused
        for i, text, meta, digest, vector in zip(
            batch.ids, batch.texts, batch.metadata, batch.hashes, batch.embeddings, strict=True
        ):
            kept[i] = (text, meta, digest, vector.tobytes())
    return kept, rejected


@given(rows=st.lists(good_rows() | FAULTY, max_size=12, unique_by=lambda r: repr(r.id)))
def test_a_batch_is_judged_as_its_rows_one_by_one(rows: list[DocumentRow]) -> None:
    batch, rejected = validate(rows, INFO)
    kept, expected_rejected = _one_by_one(rows)
    assert rejected == expected_rejected
    assert batch.ids == sorted(kept)
    got = zip(batch.ids, batch.texts, batch.metadata, batch.hashes, batch.embeddings, strict=True)
    assert {i: (t, m, h, v.tobytes()) for i, t, m, h, v in got} == kept


@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal(backend="asyncio") as p:
        yield p


@pytest.fixture(scope="module")
def uri(postgres: EmbeddedPostgres, portal: BlockingPortal) -> str:
    """The session's Postgres, migrated (pgvector's types installed) by opening a Store on it."""
    portal.call(lambda: _migrate(postgres.uri))
    return postgres.uri


async def _migrate(uri: str) -> None:
    await (await Store.open(uri)).close()


async def _round_trip(uri: str, rows: list[DocumentRow], first: int | NDArray[np.int64]) -> list[tuple[Any, ...]]:
    batch, rejected = validate(rows, INFO)
    assert rejected == []
    async with await AsyncConnection.connect(uri) as conn:
        await conn.execute(
            "CREATE TEMP TABLE t (collection_id int8, embedding vector, id text, text text, metadata jsonb,"
            " content_hash bytea)"
        )
        async with conn.cursor() as cur:
            columns = "collection_id, embedding, id, text, metadata, content_hash"
            async with cur.copy(f"COPY t ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                for chunk in copy_chunks(first, batch):
                    await copy.write(chunk)
            # float4send: the stored values' bits, as text that psycopg will not round.
            await cur.execute(
                "SELECT collection_id, id, text, metadata, content_hash,"
                " (SELECT string_agg(encode(float4send(x), 'hex'), '' ORDER BY n)"
                "  FROM unnest(embedding::real[]) WITH ORDINALITY AS u(x, n))"
                ' FROM t ORDER BY id COLLATE "C"'
            )
            return await cur.fetchall()


@given(rows=st.lists(good_rows(), min_size=1, max_size=8, unique_by=lambda r: r.id), staged=st.booleans())
def test_the_copy_stream_reads_back_exactly(
    uri: str, portal: BlockingPortal, rows: list[DocumentRow], staged: bool
) -> None:
    rows = [r for r in rows if not isinstance(r.embedding, list) and r.embedding.dtype == np.float32]
    first = np.arange(len(rows), dtype=np.int64) * 3 if staged else INFO.id
    stored = portal.call(_round_trip, uri, rows, first)
    expected = sorted(rows, key=lambda r: r.id.encode())
    assert [r[1] for r in stored] == [r.id for r in expected]
    for k, (row, (collection_id, _, text, metadata, digest, bits)) in enumerate(zip(expected, stored, strict=True)):
        assert collection_id == (k * 3 if staged else INFO.id)
        assert (text, digest) == (row.text, row.content_hash)
        assert metadata == json.loads(json.dumps(row.metadata))
        assert bits == np.asarray(row.embedding, ">f4").tobytes().hex()


@pytest.mark.parametrize("n", [0, 1, 127, 128, 129, 300])
@pytest.mark.parametrize("staged", [False, True])
def test_a_stream_encoded_chunk_by_chunk_is_the_whole_stream(
    uri: str, portal: BlockingPortal, n: int, staged: bool
) -> None:
    vectors = np.random.default_rng(n).standard_normal((n, DIM)).astype(np.float32) + 4.0
    rows = [DocumentRow(f"d{i:04}", f"t{i}", {"i": i}, f"{i}".encode(), vectors[i]) for i in range(n)]
    batch, rejected = validate(rows, INFO)
    assert rejected == [] and len(batch) == n
    first = np.arange(n, dtype=np.int64) if staged else INFO.id
    chunks = list(copy_chunks(first, batch))
    assert len(chunks) == max(1, -(-n // 128))
    whole = _native.copy_binary(
        first, batch.embeddings, batch.ids, batch.texts, batch.metadata, batch.hashes, chunk_rows=1 << 20
    )
    assert b"".join(chunks) == b"".join(whole)
    stored = portal.call(_round_trip, uri, rows, first)
    assert [r[1] for r in stored] == [r.id for r in rows]
