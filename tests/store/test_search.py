from __future__ import annotations

import numpy as np
import pytest
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from embedpool.errors import InvalidArgument, NotFound
from embedpool.store import EmbeddedPostgres, Store
from embedpool.store._codec import configure_connection
from embedpool.store.search import ef_search, search_query

from .conftest import rows, unique_name, unit_vectors

pytestmark = pytest.mark.anyio
DIM, N = 32, 2000


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


CLUSTER = 150


@pytest.fixture(scope="module")
async def corpus(postgres: EmbeddedPostgres) -> tuple[str, np.ndarray]:
    """N unit vectors tagged "common"; the last CLUSTER of them huddle around vectors[0] and are tagged "cluster"."""
    name = unique_name("search")
    vectors = unit_vectors(N, DIM, seed=1)
    noise = unit_vectors(CLUSTER, DIM, seed=2) * 0.2
    vectors[-CLUSTER:] = vectors[0] + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    batch = rows(vectors)
    for i, row in enumerate(batch):
        row.metadata["kind"] = "cluster" if i >= N - CLUSTER else "common"
    store = await Store.open(postgres.uri)
    try:
        await store.create_collection(name, model="m", dim=DIM)
        await store.upsert(name, batch)
        info = await store.get_collection(name)
    finally:
        await store.close()
    # Statistics as autovacuum would soon have them; without, the planner takes the fresh partition for tiny
    # and sorts it exactly, and these tests would not exercise the index.
    async with await AsyncConnection.connect(postgres.uri, autocommit=True) as conn:
        await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(f"documents_c{info.id}")))
    return name, vectors


async def test_own_document_is_the_first_candidate(store: Store, corpus: tuple[str, np.ndarray]) -> None:
    name, vectors = corpus
    for i in (0, 17, 1999):
        found = await store.search(name, vectors[i], k=10)
        assert len(found) == 10
        assert found[0].id == f"d{i}"
        assert found[0].distance == pytest.approx(0.0, abs=1e-5)
        np.testing.assert_allclose(found[0].embedding, vectors[i], rtol=0, atol=0)
        assert [c.distance for c in found] == sorted(c.distance for c in found)


async def test_filter_fills_the_candidates_where_the_neighbourhood_does_not_match(
    store: Store, corpus: tuple[str, np.ndarray]
) -> None:
    """The filter matches 92% of the collection, so the planner picks the HNSW index, but none of the CLUSTER
    nearest neighbours of the query: without an iterative scan the ef_search (40) nearest hold only the
    query's own document."""
    name, vectors = corpus
    found = await store.search(name, vectors[0], k=30, filter={"kind": "common"})
    assert len(found) == 30
    assert all(c.metadata["kind"] == "common" for c in found)
    assert found[0].id == "d0"
    common = vectors[: N - CLUSTER]
    exact = {f"d{i}" for i in np.argsort(1 - common @ vectors[0])[:30]}
    assert len({c.id for c in found} & exact) >= 27  # approximate, but close


async def test_selective_filter(store: Store, corpus: tuple[str, np.ndarray]) -> None:
    name, vectors = corpus
    found = await store.search(name, vectors[1], k=200, filter={"kind": "cluster"})
    assert len(found) == CLUSTER
    assert all(c.metadata["kind"] == "cluster" for c in found)


async def test_max_distance_cuts_far_candidates(store: Store, corpus: tuple[str, np.ndarray]) -> None:
    name, vectors = corpus
    found = await store.search(name, vectors[3], k=50, max_distance=0.5)
    assert found and all(c.distance <= 0.5 for c in found)
    assert len(found) < 50


async def test_bad_queries_are_invalid(store: Store, corpus: tuple[str, np.ndarray]) -> None:
    name, vectors = corpus
    with pytest.raises(InvalidArgument, match="dim 32"):
        await store.search(name, vectors[0][:8], k=5)
    with pytest.raises(InvalidArgument):
        await store.search(name, np.full(DIM, np.inf, np.float32), k=5)
    with pytest.raises(InvalidArgument):
        await store.search(name, vectors[0], k=0)


@pytest.mark.parametrize("filtered", [False, True])
async def test_plan_uses_the_collection_hnsw_index(
    postgres: EmbeddedPostgres, store: Store, corpus: tuple[str, np.ndarray], filtered: bool
) -> None:
    name, vectors = corpus
    info = await store.get_collection(name)
    params: dict[str, object] = {"query": vectors[0], "fetch": 40, "k": 10}
    if filtered:
        params["filter"] = Jsonb({"kind": "common"})  # the planner's choice depends on selectivity
    query = search_query(info, filtered=filtered, max_distance=False)
    async with await AsyncConnection.connect(postgres.uri, autocommit=True) as conn:
        await configure_connection(conn)
        cur = await conn.execute(b"EXPLAIN " + query.as_bytes(conn), params, prepare=False)
        plan = "\n".join(row[0] for row in await cur.fetchall())
    assert f"Index Scan using documents_c{info.id}_hnsw" in plan, plan


def test_ef_search_bounds() -> None:
    assert [ef_search(c) for c in (1, 20, 30, 400, 600, 5000)] == [40, 40, 40, 400, 600, 1000]


async def test_generic_plan_uses_the_index_too(
    postgres: EmbeddedPostgres, store: Store, corpus: tuple[str, np.ndarray]
) -> None:
    """Unfiltered searches are prepared after a few executions; the generic plan must walk the HNSW index.
    (Filtered ones are not prepared: a generic plan cannot see the filter's selectivity.)"""
    name, _ = corpus
    info = await store.get_collection(name)
    async with await AsyncConnection.connect(postgres.uri, autocommit=True) as conn:
        text = search_query(info, filtered=False, max_distance=False).as_string(conn)
        text = text.replace("%(query)s", "$1").replace("%(fetch)s", "$2").replace("%(k)s", "$3")
        cur = await conn.execute(f"EXPLAIN (GENERIC_PLAN) {text}".encode(), prepare=False)
        plan = "\n".join(row[0] for row in await cur.fetchall())
    assert f"Index Scan using documents_c{info.id}_hnsw" in plan, plan


async def test_a_collection_recreated_by_another_client_is_looked_up_again(postgres: EmbeddedPostgres) -> None:
    name, vectors = unique_name("recreated"), unit_vectors(5, DIM, seed=4)
    searcher, other = await Store.open(postgres.uri, max_size=1), await Store.open(postgres.uri, max_size=1)
    try:
        await other.create_collection(name, model="m", dim=DIM)
        await other.upsert(name, rows(vectors, tag="old"))
        assert (await searcher.search(name, vectors[0], k=1))[0].text == "text 0 old"
        await other.drop_collection(name)
        with pytest.raises(NotFound):
            await searcher.search(name, vectors[0], k=1)
        await other.create_collection(name, model="m", dim=DIM)
        await other.upsert(name, rows(vectors, tag="new"))
        assert (await searcher.search(name, vectors[0], k=1))[0].text == "text 0 new"
        await other.drop_collection(name)
        await other.create_collection(name, model="m", dim=DIM)  # dropped and re-created between two searches
        assert await searcher.search(name, vectors[0], k=1) == []
    finally:
        await searcher.close()
        await other.close()
