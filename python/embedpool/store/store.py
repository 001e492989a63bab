"""`Store`: the async facade over a connection pool. Each method is one short transaction or statement."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import numpy as np
import psycopg
from numpy.typing import NDArray
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from embedpool.errors import EmbedpoolError
from embedpool.store import collections, search, writer
from embedpool.store._codec import configure_connection
from embedpool.store.catalog import CollectionCache
from embedpool.store.collections import HnswOptions
from embedpool.store.dberrors import database_errors
from embedpool.store.liveness import IdleCheck
from embedpool.store.migrations import migrate_up
from embedpool.store.records import CollectionInfo, CollectionStats, DocumentRow, Hit, UpsertResult

T = TypeVar("T")
_log = logging.getLogger("embedpool.store")
# The first key of the advisory locks on a collection's index (the second is the collection's id).
_INDEX_LOCK = 0x656D6270

__all__ = ["Store"]


def _graph_mb(rows: int, dim: int) -> int:
    """pgvector's HNSW build is fastest when the whole graph fits in maintenance_work_mem: per element the
    vector plus ~700 bytes of neighbour lists and bookkeeping (m=16), with a quarter of headroom."""
    return min(4096, max(64, math.ceil(rows * (4 * dim + 700) * 1.25 / 2**20)))


class Store:
    def __init__(self, pool: AsyncConnectionPool[AsyncConnection[Any]]) -> None:
        """Use `await Store.open(url)`."""
        self._pool = pool
        conninfo = pool.conninfo
        self._url = conninfo if isinstance(conninfo, str) else ""
        """For the connections the store holds outside its pool (LISTEN, index locks)."""
        # Collection rows for the per-request checks and reads (writes look the row up again, under a lock).
        self._cache = CollectionCache()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 8,
        timeout: float = 10.0,
        statement_timeout: float = 30.0,
        lock_timeout: float = 10.0,
    ) -> Store:
        """Connect, migrate the schema up, and open a pool. `timeout`: seconds to wait for a connection;
        `statement_timeout`/`lock_timeout`: the pool's connections give up on a statement (or on waiting for a
        lock) after that many seconds (0: never), so a stuck database cannot hold requests forever. Index
        builds lift the statement timeout for their own transaction."""
        connect_timeout = max(1, math.ceil(timeout))
        options = f"-c statement_timeout={round(statement_timeout * 1000)} -c lock_timeout={round(lock_timeout * 1000)}"
        with database_errors():
            async with await AsyncConnection.connect(url, autocommit=True, connect_timeout=connect_timeout) as conn:
                await migrate_up(conn)
            pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
                url,
                min_size=min_size,
                max_size=max_size,
                kwargs={"autocommit": True, "connect_timeout": connect_timeout, "options": options},
                configure=configure_connection,
                # After a database restart, stale connections are replaced instead of failing the first request
                # that draws each of them.
                check=(check := IdleCheck()),
                timeout=timeout,
                # The pool retries a failed connect with doubling delays, without bound but this one: after a
                # minute-long outage it would wait a minute more once the database is back. Giving up after
                # `timeout` instead lets the next request start a fresh, immediate attempt.
                reconnect_timeout=timeout,
                open=False,
                name="embedpool-store",
            )
            check.watch(pool)
            try:
                await pool.open(wait=True, timeout=timeout)
            except BaseException:
                await pool.close()
                raise
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The store's background work for the block: collection rows cached, kept right by LISTEN (see
        store.catalog; without it every request looks its collection up, one primary-key read), and indexes
        that an interrupted bulk load left unbuilt built (searches scan exactly meanwhile)."""
        async with anyio.create_task_group() as tg:
            await tg.start(self._cache.watch, self._url)
            tg.start_soon(self._finish_interrupted_builds_logged)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()

    async def _finish_interrupted_builds_logged(self) -> None:
        try:
            await self.finish_interrupted_builds()
        except EmbedpoolError as e:  # the next start tries again; serving goes on
            _log.warning("could not finish interrupted index builds: %s (%s)", e, e.__cause__)

    async def collection(self, name: str) -> CollectionInfo:
        """The collection's row (no count): from the cache when it is live, else one primary-key read."""
        info = self._cache.get(name)
        if info is None:
            async with self._connection() as conn:
                info = await self._lookup(conn, name)
        return info

    @property
    def url(self) -> str:
        """The database's URL, for the connections kept outside the pool (LISTEN)."""
        return self._url

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled connection (autocommit) for one short piece of work; database errors become domain ones."""
        async with self._connection() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        with database_errors():
            async with self._pool.connection() as conn:
                yield conn

    async def create_collection(
        self,
        name: str,
        *,
        model: str,
        dim: int,
        metric: str = "cosine",
        hnsw: HnswOptions | None = None,
        storage: str = "float32",
    ) -> CollectionInfo:
        """Idempotent for the same definition; AlreadyExists when `name` has a different one. `hnsw`: how its
        index is built (None: `HnswOptions()`'s defaults); `storage`: float32, float16 or binary (store.storage)."""
        async with self._connection() as conn:
            return await collections.create(conn, name, model=model, dim=dim, metric=metric, hnsw=hnsw, storage=storage)

    async def hnsw_options(self, name: str) -> HnswOptions:
        async with self._connection() as conn:
            return (await collections.lookup(conn, name)).hnsw

    async def get_collection(self, name: str) -> CollectionInfo:
        """With its exact document count (a scan of the collection); NotFound when missing."""
        async with self._connection() as conn:
            return await collections.get(conn, name)

    async def list_collections(self) -> list[CollectionInfo]:
        """By name, each with an estimated document count (`count_estimated`): exact counts would scan every
        collection."""
        async with self._connection() as conn:
            return await collections.list_all(conn)

    async def drop_collection(self, name: str) -> None:
        self._cache.forget(name)
        async with self._connection() as conn:
            await collections.drop(conn, name)

    @contextlib.asynccontextmanager
    async def bulk_load(
        self, collection: str, *, maintenance_work_mem: str | None = None, parallel_workers: int | None = None
    ) -> AsyncIterator[bool]:
        """A block for a large load: yields whether it runs in bulk mode.

        Bulk mode, when the collection is empty (or a previous bulk load left it without its index): the HNSW
        index is dropped, upserts in the block write the table only, and the index is built once at the end
        (also when the block raises; if that fails, the next bulk_load or `build_index` builds it). Searches
        meanwhile scan exactly. Otherwise incremental: the block changes nothing, rows enter the graph as
        they are written. `maintenance_work_mem` defaults to an estimate of the graph's size (64MB..4GB);
        `parallel_workers` to the server's max_parallel_maintenance_workers.
        """
        async with self._index_owner(collection) as owner:
            if not owner:  # another server is loading it in bulk, or finishing such a load: load incrementally
                yield False
                return
            async with self._connection() as conn:
                bulk = await collections.drop_index_if_empty(conn, collection)
            try:
                yield bulk
            finally:
                if bulk:
                    # Shielded: a cancelled load (a client gone, a shutdown) must not leave the collection
                    # unindexed. A crash does; `finish_interrupted_builds` at the next start repairs that.
                    with anyio.CancelScope(shield=True):
                        await self.build_index(
                            collection, maintenance_work_mem=maintenance_work_mem, parallel_workers=parallel_workers
                        )

    @contextlib.asynccontextmanager
    async def _index_owner(self, collection: str) -> AsyncIterator[bool]:
        """Whether this block owns the collection's index (a bulk load, or the build after one): a session-level
        advisory lock on a connection of its own, so a crashed owner's lock ends with its connection."""
        info = await self.collection(collection)
        with database_errors():
            async with await AsyncConnection.connect(self._url, autocommit=True) as conn:
                cur = await conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (_INDEX_LOCK, info.id))
                row = await cur.fetchone()
                owner = bool(row and row[0])
                try:
                    yield owner
                finally:
                    if owner:
                        with anyio.CancelScope(shield=True), contextlib.suppress(psycopg.Error):
                            await conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_INDEX_LOCK, info.id))

    async def finish_interrupted_builds(self) -> list[str]:
        """Build the index of every collection left without one by a bulk load that did not finish (a crash,
        a killed server), unless another server is on it; the names built. Run at start-up."""
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT name FROM collections"
                " WHERE to_regclass(quote_ident('documents_c' || id || '_hnsw')) IS NULL ORDER BY name"
            )
            missing = [name for (name,) in await cur.fetchall()]
        built = []
        for name in missing:
            async with self._index_owner(name) as owner:
                if owner:
                    _log.warning("collection %r has no index (an interrupted bulk load?): building it", name)
                    await self.build_index(name)
                    built.append(name)
        return built

    async def build_index(
        self, collection: str, *, maintenance_work_mem: str | None = None, parallel_workers: int | None = None
    ) -> None:
        """Build the collection's HNSW index if it is missing (after a bulk load); see `bulk_load`."""
        if maintenance_work_mem is None:
            stats = await self.stats(collection)
            info = await self.collection(collection)
            maintenance_work_mem = f"{_graph_mb(stats.count, info.dim)}MB"
        async with self._connection() as conn:
            await collections.build_index(
                conn, collection, maintenance_work_mem=maintenance_work_mem, parallel_workers=parallel_workers
            )

    async def upsert(
        self,
        collection: str,
        docs: Sequence[DocumentRow],
        assumed: Mapping[str, bytes] | None = None,
        *,
        absent: bool = False,
        remove: Sequence[str] = (),
    ) -> UpsertResult:
        """Store the valid rows in one transaction; invalid ones come back in `rejected`. `assumed`: ids left
        out as unchanged, with the hash they were seen with; writer.StaleAssumption if one changed since.
        `absent`: none of the rows' ids was stored when the caller read their hashes (see writer.upsert).
        `remove`: ids deleted in the same transaction."""
        async with self._connection() as conn:
            return await self._on_collection(
                conn, collection, lambda info: writer.upsert(conn, info, docs, assumed, absent=absent, remove=remove)
            )

    async def existing_hashes(self, collection: str, ids: Sequence[str]) -> dict[str, bytes]:
        checked = writer.checked_ids(ids)
        async with self._connection() as conn:
            return await self._on_collection(conn, collection, lambda info: writer.hashes(conn, info, checked))

    async def search(
        self,
        collection: str,
        query: NDArray[np.float32],
        *,
        k: int,
        candidates: int | None = None,
        filter: dict[str, Any] | None = None,
        max_distance: float | None = None,
    ) -> list[Hit]:
        """The k nearest documents, nearest first, with exact distances: the exact top k of `candidates`
        (default: search.default_candidates(k)) approximate ones from the HNSW index; metadata @> filter
        when given; none farther than `max_distance`."""
        async with self._connection() as conn:
            return await self._on_collection(
                conn,
                collection,
                lambda info: search.search(
                    conn, info, query, k=k, candidates=candidates, filter=filter, max_distance=max_distance
                ),
            )

    async def _on_collection(
        self, conn: AsyncConnection[Any], name: str, work: Callable[[CollectionInfo], Awaitable[T]]
    ) -> T:
        """`work` on the collection's row, cached or looked up; looked up again once if the cached row was of a
        collection dropped (perhaps re-created) since."""
        for attempt in (1, 2):
            info = self._cache.get(name) or await self._lookup(conn, name)
            try:
                return await work(info)
            except psycopg.errors.UndefinedTable:
                self._cache.forget(name)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _lookup(self, conn: AsyncConnection[Any], name: str) -> CollectionInfo:
        generation = self._cache.generation
        info = await collections.lookup(conn, name)
        self._cache.put(name, info, generation)
        return info

    async def delete(self, collection: str, ids: Sequence[str]) -> int:
        async with self._connection() as conn:
            return await writer.delete(conn, collection, ids)

    async def document_ids(self, collection: str, *, after: str | None = None, limit: int = 10_000) -> list[str]:
        """A page of the collection's ids in id order: pass the last one as `after` for the next."""
        async with self._connection() as conn:
            return await writer.ids_after(conn, collection, after, limit)

    async def delete_where(self, collection: str, filter: dict[str, Any]) -> int:
        async with self._connection() as conn:
            return await writer.delete_where(conn, collection, filter)

    async def stats(self, collection: str) -> CollectionStats:
        async with self._connection() as conn:
            return await collections.stats(conn, collection)
