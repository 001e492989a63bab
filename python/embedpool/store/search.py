"""Approximate nearest candidates from a collection's HNSW index; the caller reranks them exactly.

The query goes through the partitioned parent with `collection_id = <value>`: the planner prunes to the one
partition and matches the ORDER BY expression (embedding::vector(dim)) to that partition's HNSW index. It is
sent unprepared so every execution gets a custom plan; a generic plan could not prune at plan time.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from embedpool.errors import InvalidArgument
from embedpool.store import collections
from embedpool.store.records import Candidate, CollectionInfo
from embedpool.store.writer import json_object

__all__ = ["MAX_CANDIDATES", "candidates_query", "ef_search", "search_candidates"]

MAX_CANDIDATES: Final = 10_000
_EF_MIN, _EF_MAX = 40, 1000  # 1000: pgvector's ceiling for hnsw.ef_search


def ef_search(candidates: int) -> int:
    """Twice the candidates asked for (recall headroom), within pgvector's bounds."""
    return min(_EF_MAX, max(_EF_MIN, 2 * candidates))


def candidates_query(info: CollectionInfo, *, filtered: bool, max_distance: bool) -> sql.Composed:
    """The search SELECT. Parameters: collection id, [filter jsonb], query vector, limit, [max distance]."""
    order_by = sql.SQL("(embedding::vector({dim})) {op} %(query)s").format(
        dim=sql.Literal(info.dim), op=collections.METRICS[info.metric].operator
    )
    where: sql.Composable = sql.SQL("collection_id = %(collection)s::int8")
    if filtered:
        where += sql.SQL(" AND metadata @> %(filter)s")
    # The distance cut goes outside the LIMIT subquery: inside, the planner could not use the index order.
    # The outer ORDER BY restores exact order, which relaxed_order iterative scans do not guarantee.
    return sql.SQL(
        "SELECT id, text, metadata, embedding, distance FROM ("
        "SELECT id, text, metadata, embedding, {order_by} AS distance FROM documents WHERE {where}"
        " ORDER BY {order_by} LIMIT %(limit)s) AS c {cut} ORDER BY distance"
    ).format(
        order_by=order_by,
        where=where,
        cut=sql.SQL("WHERE distance <= %(max_distance)s" if max_distance else ""),
    )


async def search_candidates(
    conn: AsyncConnection[Any],
    collection: str,
    query: NDArray[np.float32],
    *,
    candidates: int,
    filter: dict[str, Any] | None = None,
    max_distance: float | None = None,
) -> list[Candidate]:
    if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= MAX_CANDIDATES:
        raise InvalidArgument(f"candidates must be an integer in 1..{MAX_CANDIDATES}, got {candidates!r}")
    params: dict[str, Any] = {"limit": candidates}
    if filter:
        json_object(filter, "filter")
        params["filter"] = Jsonb(filter)
    elif filter is not None:
        json_object(filter, "filter")  # {} filters nothing; anything else that is falsy is a type error
    if max_distance is not None:
        params["max_distance"] = float(max_distance)
    async with conn.transaction():
        info = await collections.lookup(conn, collection)
        params["collection"] = info.id
        params["query"] = _query_vector(query, info)
        ef = ef_search(candidates)
        await conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef),))
        if "filter" in params or candidates > ef:
            # Without it the index yields at most ef_search rows, and a selective filter then leaves fewer
            # than asked. relaxed_order keeps scanning the graph until enough rows pass (pgvector >= 0.8).
            await conn.execute("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)")
        query_sql = candidates_query(info, filtered="filter" in params, max_distance=max_distance is not None)
        cur = conn.cursor(binary=True)
        await cur.execute(query_sql, params, prepare=False)
        return [Candidate(*row) for row in await cur.fetchall()]


def _query_vector(query: NDArray[np.float32], info: CollectionInfo) -> NDArray[np.float32]:
    try:
        vector = np.asarray(query, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidArgument("query vector is not an array of numbers") from None
    if vector.shape != (info.dim,):
        raise InvalidArgument(f"query vector has shape {vector.shape}, collection '{info.name}' has dim {info.dim}")
    if not np.isfinite(vector).all():
        raise InvalidArgument("query vector has a NaN or infinite value")
    return vector
