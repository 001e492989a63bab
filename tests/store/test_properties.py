"""Whatever text a caller sends (unicode, quotes, SQL-looking strings) is data: it round-trips exactly and
never reaches another collection."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import assume, given
from hypothesis import strategies as st

from embedpool.store import DocumentRow, EmbeddedPostgres, Store

from .conftest import rows, unit_vectors

DIM = 4
SENTINEL = "sentinel; DROP TABLE documents; --"
# Everything Postgres text can hold: no NUL, no lone surrogates.
CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
SQLISH = st.sampled_from(["'", '"', "';--", "\\", "%s", "%(x)s", "{}", "$1", "DROP TABLE documents", "🦀", "ä"])
TEXT = st.lists(st.one_of(st.text(CHARS, max_size=8), SQLISH), max_size=4).map("".join)
NAME = TEXT.filter(lambda s: 0 < len(s) <= 255)
DOC_ID = TEXT.filter(lambda s: 0 < len(s.encode()) <= 512)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(-1e15, 1e15, allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
METADATA = st.dictionaries(TEXT, JSON, max_size=4)


@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal(backend="asyncio") as p:
        yield p


@pytest.fixture(scope="module")
def store(postgres: EmbeddedPostgres, portal: BlockingPortal) -> Iterator[Store]:
    s = portal.call(Store.open, postgres.uri)
    portal.call(_reset_sentinel, s)
    try:
        yield s
    finally:
        portal.call(s.close)


async def _reset_sentinel(store: Store) -> None:
    await store.create_collection(SENTINEL, model="m", dim=DIM)
    await store.delete_where(SENTINEL, {"tag": "v1"})
    await store.upsert(SENTINEL, rows(unit_vectors(5, DIM, seed=7)))


async def _contents(store: Store, name: str) -> dict[str, tuple[str, dict[str, Any]]]:
    found = await store.search(name, np.ones(DIM, np.float32), k=100)
    return {c.id: (c.text, c.metadata) for c in found}


@given(name=NAME, docs=st.lists(st.tuples(DOC_ID, TEXT, METADATA), max_size=8, unique_by=lambda d: d[0]))
def test_arbitrary_names_ids_and_metadata_round_trip(
    store: Store, portal: BlockingPortal, name: str, docs: list[tuple[str, str, dict[str, Any]]]
) -> None:
    assume(name != SENTINEL)
    sentinel_before = portal.call(_contents, store, SENTINEL)
    vectors = unit_vectors(len(docs), DIM, seed=len(docs))
    batch = [DocumentRow(i, t, m, t.encode(), v) for (i, t, m), v in zip(docs, vectors, strict=True)]

    info = portal.call(lambda: store.create_collection(name, model="m'; --", dim=DIM))
    try:
        assert info.name == name
        result = portal.call(store.upsert, name, batch)
        assert (result.inserted, result.rejected) == (len(docs), [])
        assert portal.call(_contents, store, name) == {i: (t, m) for i, t, m in docs}
        assert portal.call(store.get_collection, name).count == len(docs)
        assert name in {c.name for c in portal.call(store.list_collections)}
        if docs:
            assert portal.call(store.existing_hashes, name, [docs[0][0]]) == {docs[0][0]: docs[0][1].encode()}
    finally:
        portal.call(store.drop_collection, name)
    assert portal.call(_contents, store, SENTINEL) == sentinel_before
