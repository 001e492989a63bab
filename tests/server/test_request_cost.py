"""A data RPC's cost does not grow with its collection's size.

Measured in buffer accesses per statement (pg_stat_statements), not in time: every statement the server
runs for Embed-into, the unchanged re-send, Search, an Ingest stream and ListCollections, once against a
collection and once against one 4x larger (both large enough that searches walk the HNSW index). A
statement that reads every row (a count(*), even as an index-only scan; a sequential scan) costs ~4x as
much on the larger one; primary-key lookups and the HNSW walk grow logarithmically.

A statement's cost is its least over a few rounds: a backend's first run of a statement also loads the
catalog entries it needs (a trigger function's plan, say), and which pooled connection, or a newly opened one,
runs which statement is chance. That one-off cost is not the collection's; a cost that grows with the
collection shows in every round.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import anyio
import grpc
import numpy as np
import psycopg
import pytest
from numpy.typing import NDArray
from psycopg import sql

from embedpool.server.app import Running
from embedpool.store import DocumentRow, EmbeddedPostgres, Store, running_postgres
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import SettingsFactory, ingest_batches, serving

SMALL, LARGE = 6000, 24000
ROUNDS = 3
# A statement may cost this much more on the large collection (the HNSW walk and B-tree depth grow a little).
GROWTH, SLACK_BLOCKS = 2.0, 20


@pytest.fixture(scope="module")
def counted_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A Postgres of its own that records every statement's buffer accesses (pg_stat_statements)."""
    with running_postgres(tmp_path_factory.mktemp("cost") / "pg") as pg:
        with psycopg.connect(pg.uri, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            conn.execute("ALTER SYSTEM SET pg_stat_statements.track_utility = off")
        pg.restart()
        with psycopg.connect(pg.uri, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        yield pg


@pytest.fixture(scope="module")
def cost_server(
    counted_postgres: EmbeddedPostgres, make_settings: SettingsFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    settings = make_settings(tmp_path_factory.mktemp("cost-server"), database_url=counted_postgres.uri)
    with serving(settings) as running:
        yield running


def _vectors(n: int, seed: int) -> NDArray[np.float32]:
    """Unit vectors near a 16-dimensional subspace, like real embeddings: HNSW walks on isotropic random
    vectors in 384 dimensions visit a share of the graph that shrinks only slowly with its size."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(0).standard_normal((16, 384))
    vectors = (rng.standard_normal((n, 16)) @ basis + 0.1 * rng.standard_normal((n, 384))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def _fill(url: str, collection: str, n: int) -> None:
    """n rows loaded in bulk (the index built once), analyzed but not vacuumed: without the visibility map a
    count(*) reads the heap, so a statement that touches every row shows it in full."""

    async def load() -> None:
        vectors = _vectors(n, seed=n)
        rows = [DocumentRow(f"r{i}", f"row {i}", {"i": i}, f"h{i}".encode(), v) for i, v in enumerate(vectors)]
        store = await Store.open(url)
        try:
            async with store.bulk_load(collection):
                for start in range(0, n, 2000):
                    await store.upsert(collection, rows[start : start + 2000])
        finally:
            await store.close()

    with psycopg.connect(url, autocommit=True) as conn:
        (part,) = conn.execute(
            "SELECT 'documents_c' || id FROM collections WHERE name = %s", (collection,)
        ).fetchone() or (None,)
        conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = off)").format(sql.Identifier(str(part))))
    anyio.run(load)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(str(part))))


def _data_rpcs(stub: pb_grpc.EmbedderStub, collection: str) -> None:
    for i in range(3):
        doc = pb.Document(id=f"new-{uuid.uuid4().hex}", text=f"a new document number {i}")
        stub.Embed(pb.EmbedRequest(collection=collection, documents=[doc], skip_vectors=True))
        stub.Embed(pb.EmbedRequest(collection=collection, documents=[doc], skip_vectors=True))  # unchanged
        query = _vectors(1, seed=100 + i)[0]
        stub.Search(pb.SearchRequest(collection=collection, vector=query.astype("<f4").tobytes(), k=10))
        stub.Search(pb.SearchRequest(collection=collection, text=f"document number {i}", k=10))
    batches = ingest_batches(collection, 3, 8, prefix=f"ingest-{uuid.uuid4().hex}-")  # new ids each call
    assert len(list(stub.Ingest(batches, timeout=60))) == 3
    stub.ListCollections(pb.ListCollectionsRequest())


def _blocks_per_statement(url: str) -> dict[str, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT query, sum(calls), sum(shared_blks_hit + shared_blks_read) FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) GROUP BY query"
        ).fetchall()
    costs: dict[str, float] = {}
    for query, calls, blocks in rows:
        shape = re.sub(r"documents_c\d+", "documents_cN", query)  # the same statement on either collection
        costs[shape] = max(costs.get(shape, 0.0), float(blocks) / max(int(calls), 1))
    return costs


def _measure(url: str, stub: pb_grpc.EmbedderStub, collection: str) -> dict[str, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
    _data_rpcs(stub, collection)
    return _blocks_per_statement(url)


def _least(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each statement's least cost over the rounds it ran in."""
    least: dict[str, float] = {}
    for costs in rounds:
        for query, blocks in costs.items():
            least[query] = min(least.get(query, blocks), blocks)
    return least


@pytest.fixture(scope="module")
def stub(cost_server: Running) -> Iterator[pb_grpc.EmbedderStub]:
    with grpc.insecure_channel(f"127.0.0.1:{cost_server.port}") as channel:
        yield pb_grpc.EmbedderStub(channel)


@pytest.fixture(scope="module")
def collections(cost_server: Running, stub: pb_grpc.EmbedderStub) -> tuple[str, str]:
    """A collection of SMALL rows and one of LARGE rows (both large enough for searches to use the index)."""
    names = f"small_{uuid.uuid4().hex[:6]}", f"large_{uuid.uuid4().hex[:6]}"
    for name, n in zip(names, (SMALL, LARGE), strict=True):
        stub.CreateCollection(pb.CreateCollectionRequest(name=name))
        _fill(cost_server.database_url, name, n)
    return names


def test_no_data_rpc_statement_grows_with_the_collection(
    cost_server: Running, stub: pb_grpc.EmbedderStub, collections: tuple[str, str]
) -> None:
    url = cost_server.database_url
    small, large = collections
    _data_rpcs(stub, small)  # warm: the cache, prepared statements, buffers
    _data_rpcs(stub, large)
    by_round = [(_measure(url, stub, small), _measure(url, stub, large)) for _ in range(ROUNDS)]
    on_small = _least([small_costs for small_costs, _ in by_round])
    on_large = _least([large_costs for _, large_costs in by_round])

    assert on_large, "pg_stat_statements recorded nothing: the measurement did not run"
    grown = {
        query: (on_small.get(query, 0.0), blocks)
        for query, blocks in on_large.items()
        if "pg_stat_statements" not in query
        # A statement recorded on the large side only has no small-side cost to compare with unless it reads a
        # collection's partition. Seen once: the collection listing (the same statement on both sides, over every
        # collection) was recorded in no small-side round of one CI run.
        and (query in on_small or "documents_cN" in query)
        and blocks > GROWTH * on_small.get(query, 0.0) + SLACK_BLOCKS
    }
    assert not grown, f"statements whose cost grows with the collection (blocks small -> large): {grown}"


def test_the_check_catches_a_count(
    cost_server: Running, stub: pb_grpc.EmbedderStub, collections: tuple[str, str]
) -> None:
    """The measurement itself: GetCollection, the one RPC that counts exactly, is caught by the same rule."""
    url = cost_server.database_url
    costs = []
    for name in collections:
        stub.GetCollection(pb.GetCollectionRequest(name=name))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
        stub.GetCollection(pb.GetCollectionRequest(name=name))
        costs.append(_blocks_per_statement(url))
    small, large = costs
    assert any(blocks > GROWTH * small.get(q, 0.0) + SLACK_BLOCKS for q, blocks in large.items()), (small, large)
