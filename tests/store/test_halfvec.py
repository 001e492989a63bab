"""Collections with a half-precision HNSW index: candidates reranked exactly against the float32 vectors."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray
from psycopg import AsyncConnection

from embedpool.errors import AlreadyExists, InvalidArgument
from embedpool.store import EmbeddedPostgres, HnswOptions, Store, search
from embedpool.store._codec import configure_connection
from embedpool.store.collections import index_name
from embedpool.store.migrations import discover, migrate_down, migrate_up

from .conftest import bucketed_collection, rows, unique_name, unit_vectors

pytestmark = pytest.mark.anyio
DIM, N = 48, 1500
HALF = HnswOptions(halfvec=True)


async def _halfvec_collection(postgres: EmbeddedPostgres, store: Store) -> tuple[str, NDArray[np.float32]]:
    """Rows enter the halfvec graph one by one (no bulk load): the index is exercised as incremental writes
    build it."""
    return await bucketed_collection(postgres, store, n=N, dim=DIM, buckets=4, seed=11, hnsw=HALF, bulk=False)


def _exact(vectors: NDArray[np.float32], query: NDArray[np.float32], k: int) -> list[str]:
    return [f"d{i}" for i in np.argsort(-(vectors @ query), kind="stable")[:k]]


async def test_halfvec_index_is_built_on_the_half_precision_expression(
    postgres: EmbeddedPostgres, store: Store
) -> None:
    name, vectors = await _halfvec_collection(postgres, store)
    info = await store.get_collection(name)
    assert info.hnsw == HALF and await store.hnsw_options(name) == HALF
    async with await AsyncConnection.connect(postgres.uri, autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_get_indexdef(%s::regclass)", (index_name(info),))
        row = await cur.fetchone()
        assert row is not None and f"halfvec({DIM})" in row[0] and "halfvec_cosine_ops" in row[0]
        await configure_connection(conn)
        query = search.search_query(info, filtered=False, max_distance=False)
        params = {"query": vectors[0], "fetch": 40, "k": 10}
        cur = await conn.execute(b"EXPLAIN " + query.as_bytes(conn), params, prepare=False)
        plan = "\n".join(r[0] for r in await cur.fetchall())
    assert f"Index Scan using {index_name(info)}" in plan, plan


async def test_hits_are_reranked_exactly_against_float32(postgres: EmbeddedPostgres, store: Store) -> None:
    """Distances are those of the stored float32 vectors (not half precision), best first, and the top k
    agrees with brute force."""
    name, vectors = await _halfvec_collection(postgres, store)
    queries = unit_vectors(20, DIM, seed=12)
    agree = 0
    for query in queries:
        found = await store.search(name, query, k=10, candidates=100)
        assert len(found) == 10
        ids = [int(hit.id[1:]) for hit in found]
        exact = 1.0 - vectors[ids] @ query
        np.testing.assert_allclose([hit.distance for hit in found], exact, atol=2e-6)
        assert [hit.distance for hit in found] == sorted(hit.distance for hit in found)
        for hit in found:
            np.testing.assert_array_equal(hit.embedding, vectors[int(hit.id[1:])])
            assert hit.text == f"text {hit.id[1:]} v1" and hit.metadata["n"] == int(hit.id[1:])
        agree += len({hit.id for hit in found} & set(_exact(vectors, query, 10)))
    assert agree / (10 * len(queries)) >= 0.95
    own = await store.search(name, vectors[5], k=1)
    assert own[0].id == "d5" and own[0].distance == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("path", ["exact", "graph"])
async def test_filter_and_max_distance(
    postgres: EmbeddedPostgres, store: Store, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A quarter of the rows match: sorted exactly (the default here), or walked on the graph and reranked."""
    if path == "graph":
        monkeypatch.setattr(search, "EXACT_MAX_ROWS", 0)
    name, vectors = await _halfvec_collection(postgres, store)
    query = vectors[7]
    for _ in range(2):
        found = await store.search(name, query, k=5, filter={"bucket": 3})
        assert len(found) == 5 and all(hit.metadata["bucket"] == 3 for hit in found)
        assert found[0].id == "d7"
    cut = float(np.sort(1.0 - vectors @ query)[19]) + 1e-6  # 20 rows lie within it
    near = await store.search(name, query, k=50, max_distance=cut)
    assert 15 <= len(near) <= 20 and all(hit.distance <= cut for hit in near)


async def test_a_candidate_changed_between_rerank_and_fetch_is_left_out(
    postgres: EmbeddedPostgres, store: Store
) -> None:
    """The documents are fetched by id after the rerank; a row rewritten in between (other hash) is not
    returned with a text its reranked vector does not belong to."""
    name, vectors = await _halfvec_collection(postgres, store)
    info = await store.get_collection(name)
    async with await AsyncConnection.connect(postgres.uri, autocommit=True) as conn:
        await configure_connection(conn)
        cur = await conn.cursor(binary=True).execute(
            search.search_query(info, filtered=False, max_distance=False),
            {"query": vectors[3], "fetch": 10, "k": 3},
        )
        candidates = await cur.fetchall()
        await store.upsert(name, rows(vectors[3:4], start=3, tag="v2"))
        hits = await search._rerank(conn, info, vectors[3], candidates, 3, None)
    assert len(hits) == 2 and "d3" not in {hit.id for hit in hits}


async def test_halfvec_needs_cosine_and_is_part_of_the_definition(store: Store) -> None:
    with pytest.raises(InvalidArgument, match="cosine"):
        await store.create_collection(unique_name("half"), model="m", dim=DIM, metric="l2", hnsw=HALF)
    name = unique_name("half")
    await store.create_collection(name, model="m", dim=DIM, hnsw=HALF)
    with pytest.raises(AlreadyExists, match="halfvec=True"):
        await store.create_collection(name, model="m", dim=DIM)
    with pytest.raises(InvalidArgument, match="bool"):
        HnswOptions(halfvec=1)  # type: ignore[arg-type]


async def test_bulk_load_rebuilds_the_halfvec_index(postgres: EmbeddedPostgres, store: Store) -> None:
    name = unique_name("half")
    info = await store.create_collection(name, model="m", dim=DIM, hnsw=HALF)
    vectors = unit_vectors(300, DIM, seed=13)
    async with store.bulk_load(name) as bulk:
        assert bulk
        await store.upsert(name, rows(vectors))
    async with await AsyncConnection.connect(postgres.uri, autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_get_indexdef(%s::regclass)", (index_name(info),))
        row = await cur.fetchone()
        assert row is not None and "halfvec_cosine_ops" in row[0]
    assert (await store.search(name, vectors[9], k=1))[0].id == "d9"


async def test_migrating_down_rebuilds_halfvec_indexes_as_vector_ones(postgres: EmbeddedPostgres) -> None:
    """0003 down: the older schema knows only vector indexes, so a halfvec one is rebuilt as such."""
    store = await Store.open(postgres.uri, max_size=1)
    try:
        name = unique_name("half")
        info = await store.create_collection(name, model="m", dim=DIM, hnsw=HALF)
        await store.upsert(name, rows(unit_vectors(20, DIM, seed=14)))
    finally:
        await store.close()
    async with await AsyncConnection.connect(postgres.uri, autocommit=True) as conn:
        latest = discover()[-1].version
        try:
            await migrate_down(conn, 2)
            cur = await conn.execute("SELECT pg_get_indexdef(%s::regclass)", (index_name(info),))
            row = await cur.fetchone()
            assert row is not None and f"vector({DIM})" in row[0] and "vector_cosine_ops" in row[0]
        finally:
            await migrate_up(conn, target=latest)
        cur = await conn.execute("SELECT hnsw_halfvec FROM collections WHERE id = %s", (info.id,))
        assert await cur.fetchone() == (False,)  # the index it now has is a vector one
        cur = await conn.execute("SELECT count(*) FROM documents WHERE collection_id = %s", (info.id,))
        assert await cur.fetchone() == (20,)
