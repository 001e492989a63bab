"""The collection cache stays right across servers sharing one database, and caches nothing unless listening."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest

from embedpool.errors import NotFound
from embedpool.store import EmbeddedPostgres, HnswOptions, Store

from .conftest import unique_name

pytestmark = pytest.mark.anyio


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 2.0) -> None:
    """Poll an async predicate: a replica hears of a change within a notification's delivery."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.02)


async def test_a_drop_and_recreate_on_another_replica_reaches_the_cache(postgres: EmbeddedPostgres) -> None:
    a = await Store.open(postgres.uri, max_size=2)
    b = await Store.open(postgres.uri, max_size=2)
    try:
        async with a.running():
            name = unique_name("catalog")
            first = await b.create_collection(name, model="m", dim=8)
            assert (await a.collection(name)).id == first.id  # now cached on a

            await b.drop_collection(name)

            async def gone() -> bool:
                try:
                    await a.collection(name)
                except NotFound:
                    return True
                return False

            await _eventually(gone)
            second = await b.create_collection(name, model="m", dim=8, hnsw=HnswOptions(m=8, ef_construction=32))

            async def recreated() -> bool:
                return (await a.collection(name)).id == second.id

            await _eventually(recreated)
            assert (await a.collection(name)).hnsw_m == 8
    finally:
        await a.close()
        await b.close()


async def test_without_the_listener_nothing_is_cached(postgres: EmbeddedPostgres) -> None:
    store = await Store.open(postgres.uri, max_size=2)
    other = await Store.open(postgres.uri, max_size=2)
    try:
        name = unique_name("catalog")
        await store.create_collection(name, model="m", dim=8)
        await store.collection(name)
        await other.drop_collection(name)
        with pytest.raises(NotFound):
            await store.collection(name)  # not watching: looked up every time, never stale
    finally:
        await store.close()
        await other.close()
