from __future__ import annotations

import dataclasses
import json

import anyio
import numpy as np
import pytest

from embedpool.errors import InvalidArgument
from embedpool.store import DocumentRow, EmbeddedPostgres, StaleAssumption, Store

from .conftest import rows, unique_name, unit_vectors

pytestmark = pytest.mark.anyio
DIM = 16


@pytest.fixture
async def collection(store: Store) -> str:
    name = unique_name()
    await store.create_collection(name, model="m", dim=DIM)
    return name


async def _stored(store: Store, collection: str, n: int) -> dict[str, str]:
    """id -> text of everything in the collection (exact: `n` candidates from a tiny collection)."""
    found = await store.search(collection, unit_vectors(1, DIM, seed=99)[0], k=n)
    return {c.id: c.text for c in found}


async def test_reupsert_of_same_rows_changes_nothing(store: Store, collection: str) -> None:
    batch = rows(unit_vectors(50, DIM))
    first = await store.upsert(collection, batch)
    assert (first.inserted, first.updated, first.unchanged, first.rejected) == (50, 0, 0, [])
    again = await store.upsert(collection, batch)
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 50)
    assert (await store.stats(collection)).count == 50


async def test_changed_content_updates_in_place(store: Store, collection: str) -> None:
    vectors = unit_vectors(10, DIM)
    await store.upsert(collection, rows(vectors))
    changed = rows(vectors[:4], tag="v2")
    result = await store.upsert(collection, changed + rows(vectors[4:], start=4))
    assert (result.inserted, result.updated, result.unchanged) == (0, 4, 6)
    stored = await _stored(store, collection, 10)
    assert len(stored) == 10
    assert stored["d0"] == "text 0 v2"
    assert stored["d9"] == "text 9 v1"
    assert await store.existing_hashes(collection, ["d0", "d9", "nope"]) == {"d0": b"0:v2", "d9": b"9:v1"}


async def test_duplicate_ids_in_one_batch_keep_the_last(store: Store, collection: str) -> None:
    vectors = unit_vectors(3, DIM)
    batch = rows(vectors[:2]) + rows(vectors[2:3], start=0, tag="last")  # d0 twice
    result = await store.upsert(collection, batch)
    assert (result.inserted, result.updated, result.unchanged) == (2, 0, 0)
    assert (await _stored(store, collection, 5))["d0"] == "text 0 last"


async def test_invalid_rows_are_reported_and_the_rest_stored(store: Store, collection: str) -> None:
    good = rows(unit_vectors(3, DIM))
    v = unit_vectors(1, DIM)[0]
    nan = v.copy()
    nan[3] = np.nan
    bad = [
        DocumentRow("wrong-dim", "t", {}, b"h", unit_vectors(1, DIM + 1)[0]),
        DocumentRow("nan", "t", {}, b"h", nan),
        DocumentRow("zero", "t", {}, b"h", np.zeros(DIM, np.float32)),
        DocumentRow("", "t", {}, b"h", v),
        DocumentRow("x" * 513, "t", {}, b"h", v),
        DocumentRow("nul-text", "a\x00b", {}, b"h", v),
        DocumentRow("not-object", "t", [1, 2], b"h", v),  # type: ignore[arg-type]
        DocumentRow("nan-meta", "t", {"x": float("nan")}, b"h", v),
        DocumentRow("nul-meta", "t", {"x": "\x00"}, b"h", v),
        DocumentRow("hash", "t", {}, "not bytes", v),  # type: ignore[arg-type]
    ]
    result = await store.upsert(collection, [bad[0], *good[:2], *bad[1:], good[2]])
    assert result.inserted == 3
    assert [rid for rid, _ in result.rejected] == [r.id for r in bad]
    reasons = dict(result.rejected)
    assert "collection dim is 16" in reasons["wrong-dim"]
    assert "NaN" in reasons["nan"]
    assert set(await _stored(store, collection, 10)) == {"d0", "d1", "d2"}


async def test_a_batch_of_only_rejects_stores_nothing(store: Store, collection: str) -> None:
    result = await store.upsert(collection, [DocumentRow("a", "t", {}, b"h", np.ones(3, np.float32))])
    assert (result.inserted, len(result.rejected)) == (0, 1)
    assert (await store.stats(collection)).count == 0


async def test_metadata_with_an_escaped_backslash_u0000_is_fine(store: Store, collection: str) -> None:
    meta = {"path": "C:\\u0000\\x"}  # a backslash, then the letters u0000: no NUL character
    result = await store.upsert(collection, [DocumentRow("a", "t", meta, b"h", unit_vectors(1, DIM)[0])])
    assert result.rejected == []
    (only,) = await store.search(collection, unit_vectors(1, DIM)[0], k=1)
    assert only.metadata == meta


async def test_delete_and_delete_where(store: Store, collection: str) -> None:
    batch = rows(unit_vectors(20, DIM))
    for i, row in enumerate(batch):
        row.metadata["parity"] = i % 2
    await store.upsert(collection, batch)
    assert await store.delete(collection, ["d0", "d1", "missing"]) == 2
    assert await store.delete(collection, []) == 0
    assert await store.delete_where(collection, {"parity": 1}) == 9
    assert sorted(await _stored(store, collection, 20), key=lambda i: int(i[1:])) == [f"d{i}" for i in range(2, 20, 2)]
    with pytest.raises(InvalidArgument, match="empty filter"):
        await store.delete_where(collection, {})
    with pytest.raises(InvalidArgument):
        await store.delete(collection, "d2")  # a str is a Sequence[str] of characters: refused


async def test_an_invalid_last_row_of_an_id_falls_back_to_the_earlier_one(store: Store, collection: str) -> None:
    vectors = unit_vectors(2, DIM)
    await store.upsert(collection, rows(vectors))
    valid = rows(vectors[:1], tag="v2")[0]
    invalid = DocumentRow("d0", "t", {"x": float("nan")}, b"other", vectors[0])
    result = await store.upsert(collection, [valid, invalid, *rows(vectors[1:], start=1)])
    assert (result.inserted, result.updated, result.unchanged) == (0, 1, 1)
    assert [rid for rid, _ in result.rejected] == ["d0"]
    assert (await _stored(store, collection, 2))["d0"] == "text 0 v2"


async def test_an_assumption_of_unchanged_rows_is_confirmed_when_writing(store: Store, collection: str) -> None:
    vectors = unit_vectors(3, DIM)
    await store.upsert(collection, rows(vectors, tag="v1"))
    # d0 and d1 were seen unchanged (hash of v1) and not embedded; d2 is written with new content.
    result = await store.upsert(collection, rows(vectors[2:], start=2, tag="v2"), {"d0": b"0:v1", "d1": b"1:v1"})
    assert (result.updated, result.unchanged) == (1, 2)

    # Another writer changes d1 before our batch is stored: our "unchanged" would be a lie, and the batch
    # would keep the other writer's row where ours was sent later. Nothing of it is written.
    await store.upsert(collection, rows(vectors[1:2], start=1, tag="other"))
    with pytest.raises(StaleAssumption) as stale:
        await store.upsert(collection, rows(vectors[2:], start=2, tag="v3"), {"d0": b"0:v1", "d1": b"1:v1"})
    assert stale.value.ids == ["d1"]
    assert (await _stored(store, collection, 3))["d2"] == "text 2 v2"


async def test_removed_ids_go_in_the_writing_transaction_or_not_at_all(store: Store, collection: str) -> None:
    vectors = unit_vectors(5, DIM)
    everything = {f"d{i}" for i in range(5)}
    await store.upsert(collection, rows(vectors, tag="v1"))
    result = await store.upsert(collection, rows(vectors[:2], tag="v2"), remove=["d2", "d3", "d4", "missing"])
    assert (result.inserted, result.updated, result.unchanged) == (0, 2, 0)
    assert set(await _stored(store, collection, 5)) == {"d0", "d1"}
    # A write that fails (an assumption gone stale) removes nothing.
    await store.upsert(collection, rows(vectors[2:], start=2, tag="v1"))
    await store.upsert(collection, rows(vectors[1:2], start=1, tag="other"))
    with pytest.raises(StaleAssumption):
        await store.upsert(collection, rows(vectors[:1], tag="v3"), {"d1": b"1:v2"}, remove=["d3", "d4"])
    assert set(await _stored(store, collection, 5)) == everything
    # Nothing to write but ids to remove; an id that is not text is refused before anything runs.
    await store.upsert(collection, [], remove=["d4"])
    assert set(await _stored(store, collection, 5)) == everything - {"d4"}
    with pytest.raises(InvalidArgument):
        await store.upsert(collection, rows(vectors[:1], tag="v4"), remove=[3])  # type: ignore[list-item]
    assert (await _stored(store, collection, 5))["d0"] == "text 0 v2"


async def test_rows_said_absent_are_copied_in_and_ones_stored_since_are_merged(store: Store, collection: str) -> None:
    """`absent=True` skips the stored-hash read. Here d0..d4 were stored after the caller looked (as a concurrent
    writer would): the straight COPY hits their keys and the batch is merged, newest content winning."""
    vectors = unit_vectors(10, DIM)
    await store.upsert(collection, rows(vectors[:5], tag="v1"))
    result = await store.upsert(collection, rows(vectors, tag="v2"), absent=True)
    assert (result.inserted, result.updated, result.unchanged) == (5, 5, 0)
    stored = await _stored(store, collection, 10)
    assert set(stored.values()) == {f"text {i} v2" for i in range(10)}
    again = await store.upsert(collection, rows(vectors, tag="v2"), absent=True)
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 10)
    fresh = await store.upsert(collection, rows(vectors[:3], start=10), absent=True)
    assert (fresh.inserted, fresh.updated, fresh.unchanged) == (3, 0, 0)
    assert (await store.stats(collection)).count == 13


async def test_rows_said_absent_still_confirm_the_assumed_ones(store: Store, collection: str) -> None:
    vectors = unit_vectors(3, DIM)
    await store.upsert(collection, rows(vectors[:2], tag="v1"))
    result = await store.upsert(collection, rows(vectors[2:], start=2), {"d0": b"0:v1"}, absent=True)
    assert (result.inserted, result.unchanged) == (1, 1)
    await store.upsert(collection, rows(vectors[1:2], start=1, tag="other"))
    with pytest.raises(StaleAssumption) as stale:
        await store.upsert(collection, rows(vectors[2:], start=2, tag="v3"), {"d1": b"1:v1"}, absent=True)
    assert stale.value.ids == ["d1"]
    assert (await _stored(store, collection, 3))["d2"] == "text 2 v1"


@pytest.mark.parametrize("storage", ["float16", "binary"])
async def test_rows_said_absent_reach_collections_stored_otherwise(store: Store, storage: str) -> None:
    name = unique_name()
    await store.create_collection(name, model="m", dim=DIM, storage=storage)
    vectors = unit_vectors(6, DIM)
    await store.upsert(name, rows(vectors[:2]))
    result = await store.upsert(name, rows(vectors, tag="v2"), absent=True)
    assert (result.inserted, result.updated, result.unchanged) == (4, 2, 0)
    assert await store.existing_hashes(name, ["d0", "d5"]) == {"d0": b"0:v2", "d5": b"5:v2"}


async def test_metadata_encoded_by_the_caller_is_stored_as_given(store: Store, collection: str) -> None:
    vectors = unit_vectors(4, DIM)
    batch = [
        dataclasses.replace(row, metadata_json=json.dumps(row.metadata, sort_keys=True, separators=(",", ":")))
        for row in rows(vectors)
    ]
    batch[3] = dataclasses.replace(batch[3], metadata={"kind": "odd"}, metadata_json='{"kind":"odd"}')
    assert (await store.upsert(collection, batch)).inserted == 4
    found = await store.search(collection, vectors[3], k=4, filter={"kind": "odd"})
    assert [(hit.id, hit.metadata) for hit in found] == [("d3", {"kind": "odd"})]
    found = await store.search(collection, vectors[0], k=1, filter={"tag": "v1", "n": 0})
    assert [(hit.id, hit.metadata) for hit in found] == [("d0", {"n": 0, "tag": "v1"})]


async def test_a_write_with_a_stale_cached_collection_goes_to_the_one_named_now(postgres: EmbeddedPostgres) -> None:
    """The writer takes the collection's row from the cache without reading it again: a row cached for a
    collection dropped since finds its partition gone, and the write is redone on the collection of that name."""
    store = await Store.open(postgres.uri, max_size=2)
    try:
        async with store.running():
            name = unique_name("stale")
            old = await store.create_collection(name, model="m", dim=DIM)
            await store.drop_collection(name)
            new = await store.create_collection(name, model="m", dim=DIM)
            await anyio.sleep(0.3)  # the drop's and the create's notifications are in
            for absent in (True, False):
                # As if the drop's notification had not arrived yet.
                store._cache.put(name, old, store._cache.generation)
                assert (await store.collection(name)).id == old.id
                result = await store.upsert(name, rows(unit_vectors(2, DIM), prefix=f"a{absent}"), absent=absent)
                assert result.inserted == 2
                assert (await store.collection(name)).id == new.id
            assert (await store.stats(name)).count == 4
    finally:
        await store.close()
