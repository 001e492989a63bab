from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from embedpool.errors import AlreadyExists, InvalidArgument, NotFound
from embedpool.store import Store

from .conftest import rows, unique_name, unit_vectors

pytestmark = pytest.mark.anyio


async def test_create_get_list_drop(store: Store) -> None:
    name = unique_name()
    info = await store.create_collection(name, model="minilm", dim=16)
    assert (info.name, info.model, info.dim, info.metric) == (name, "minilm", 16, "cosine")
    await store.upsert(name, rows(unit_vectors(3, 16)))

    got = await store.get_collection(name)
    assert (got.id, got.count, got.count_estimated) == (info.id, 3, False)
    # Listing estimates from Postgres' statistics, which catch up with the writes within seconds.
    listed = {c.name: c for c in await store.list_collections()}
    assert listed[name].count_estimated and listed[name].count in (0, 3)
    with anyio.fail_after(30):
        while listed[name].count != 3:
            await anyio.sleep(0.2)
            listed = {c.name: c for c in await store.list_collections()}

    await store.drop_collection(name)
    with pytest.raises(NotFound, match=f"collection '{name}' does not exist"):
        await store.get_collection(name)
    assert name not in {c.name for c in await store.list_collections()}
    with pytest.raises(NotFound):
        await store.drop_collection(name)


async def test_create_is_idempotent_for_the_same_definition(store: Store) -> None:
    name = unique_name()
    first = await store.create_collection(name, model="m", dim=8)
    assert await store.create_collection(name, model="m", dim=8) == first
    with pytest.raises(AlreadyExists, match="dim=8"):
        await store.create_collection(name, model="m", dim=9)
    with pytest.raises(AlreadyExists):
        await store.create_collection(name, model="other", dim=8)


async def test_recreated_collection_starts_empty(store: Store) -> None:
    name = unique_name()
    await store.create_collection(name, model="m", dim=4)
    await store.upsert(name, rows(unit_vectors(5, 4)))
    await store.drop_collection(name)
    await store.create_collection(name, model="m", dim=6)
    assert (await store.get_collection(name)).count == 0
    assert (await store.stats(name)).count == 0


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("", {}),
        ("x\x00y", {}),
        ("ok", {"dim": 0}),
        ("ok", {"dim": 2001}),
        ("ok", {"dim": True}),
        ("ok", {"metric": "hamming"}),
        ("ok", {"model": ""}),
    ],
)
async def test_create_rejects_bad_definitions(store: Store, name: str, kwargs: dict[str, object]) -> None:
    args: dict[str, Any] = {"model": "m", "dim": 8} | kwargs
    with pytest.raises(InvalidArgument):
        await store.create_collection(name, **args)


async def test_unknown_collection_is_not_found_everywhere(store: Store) -> None:
    name = unique_name("missing")
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get_collection(name),
        lambda: store.upsert(name, rows(unit_vectors(1, 4))),
        lambda: store.existing_hashes(name, ["a"]),
        lambda: store.search(name, unit_vectors(1, 4)[0], k=3),
        lambda: store.delete(name, ["a"]),
        lambda: store.delete_where(name, {"a": 1}),
        lambda: store.stats(name),
    ]
    for call in calls:
        with pytest.raises(NotFound):
            await call()


async def test_stats_report_index_size(store: Store) -> None:
    name = unique_name()
    await store.create_collection(name, model="m", dim=32)
    await store.upsert(name, rows(unit_vectors(200, 32)))
    stats = await store.stats(name)
    assert stats.count == 200
    assert stats.index_bytes > 8192
    assert stats.table_bytes > 0
