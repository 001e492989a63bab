"""Store fixtures: one embedded Postgres for the session (real server, no mocks) and a Store per test."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
from numpy.typing import NDArray

from embedpool.store import DocumentRow, EmbeddedPostgres, Store, running_postgres

_names = itertools.count()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    with running_postgres(tmp_path_factory.mktemp("store") / "pg") as pg:
        yield pg


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # grpc.aio, which shares this store, runs on asyncio only


@pytest.fixture
async def store(postgres: EmbeddedPostgres) -> AsyncIterator[Store]:
    if not postgres.running:  # a fault test that failed half-way must not take the rest down with it
        postgres.start()
    s = await Store.open(postgres.uri, max_size=4, timeout=3.0)
    try:
        yield s
    finally:
        await s.close()


def unique_name(prefix: str = "c") -> str:
    return f"{prefix}-{next(_names)}"


def unit_vectors(n: int, dim: int, seed: int = 0) -> NDArray[np.float32]:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def rows(vectors: NDArray[np.float32], *, prefix: str = "d", start: int = 0, tag: str = "v1") -> list[DocumentRow]:
    """One row per vector, ids prefix0.., content hash derived from `tag` so a new tag means changed content."""
    return [
        DocumentRow(
            id=f"{prefix}{start + i}",
            text=f"text {start + i} {tag}",
            metadata={"n": start + i, "tag": tag},
            content_hash=f"{start + i}:{tag}".encode(),
            embedding=v,
        )
        for i, v in enumerate(vectors)
    ]
