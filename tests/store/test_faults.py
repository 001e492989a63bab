"""Postgres going away mid-batch: callers get Unavailable, nothing partial is visible, and a retry after the
restart leaves exactly one row per document."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import pytest

from embedpool.errors import Unavailable
from embedpool.store import DocumentRow, EmbeddedPostgres, Store

from .conftest import rows, unique_name, unit_vectors

pytestmark = pytest.mark.anyio
DIM = 8


class _StopsPostgresHalfway(Sequence[DocumentRow]):
    """A batch that stops the server while the writer is part-way through it, inside its transaction."""

    def __init__(self, rows: list[DocumentRow], postgres: EmbeddedPostgres) -> None:
        self._rows, self._postgres = rows, postgres

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, i: int) -> DocumentRow: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[DocumentRow]: ...
    def __getitem__(self, i: int | slice) -> DocumentRow | Sequence[DocumentRow]:
        return self._rows[i]

    def __iter__(self) -> Iterator[DocumentRow]:
        for n, row in enumerate(self._rows):
            if n == len(self._rows) // 2:
                self._postgres.stop()
            yield row


async def test_stop_mid_batch_then_retry(postgres: EmbeddedPostgres) -> None:
    name = unique_name("fault")
    first = rows(unit_vectors(100, DIM, seed=1))
    second = rows(unit_vectors(300, DIM, seed=2), start=50, tag="v2")  # overlaps 50 ids of the first batch
    store = await Store.open(postgres.uri, max_size=2, timeout=2.0)
    try:
        await store.create_collection(name, model="m", dim=DIM)
        assert (await store.upsert(name, first)).inserted == 100

        with pytest.raises(Unavailable, match="database unavailable"):
            await store.upsert(name, _StopsPostgresHalfway(second, postgres))
        assert not postgres.running
        with pytest.raises(Unavailable):
            await store.upsert(name, second)
        with pytest.raises(Unavailable):
            await store.search(name, first[0].embedding, k=5)

        postgres.start()
        # Nothing of the interrupted batch is visible: the first batch, unchanged.
        assert (await store.stats(name)).count == 100
        assert await store.existing_hashes(name, ["d60", "d200"]) == {"d60": b"60:v1"}

        # The caller retries both batches, as a client that never saw an answer would.
        retried = await store.upsert(name, second)
        assert (retried.inserted, retried.updated, retried.unchanged) == (250, 50, 0)
        again = await store.upsert(name, first[:50] + second)
        assert (again.inserted, again.updated, again.unchanged) == (0, 0, 350)
        assert (await store.get_collection(name)).count == 350
        hashes = await store.existing_hashes(name, [f"d{i}" for i in range(400)])
        assert len(hashes) == 350
        assert hashes["d49"] == b"49:v1"
        assert hashes["d50"] == b"50:v2"
    finally:
        if not postgres.running:
            postgres.start()
        await store.close()


async def test_open_against_a_stopped_server_is_unavailable(postgres: EmbeddedPostgres) -> None:
    postgres.stop()
    try:
        with pytest.raises(Unavailable):
            await Store.open(postgres.uri, timeout=1.0)
    finally:
        postgres.start()


def test_start_and_stop_are_idempotent(postgres: EmbeddedPostgres) -> None:
    uri = postgres.uri
    assert postgres.start() == uri
    postgres.stop()
    postgres.stop()
    assert not postgres.running
    assert postgres.restart() == uri
    assert postgres.running
