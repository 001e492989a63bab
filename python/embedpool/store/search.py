"""Approximate nearest candidates from a collection's HNSW index; the caller reranks them exactly.

The query names the collection's partition (documents_c<id>), so the planner matches the ORDER BY
expression (embedding::vector(dim)) to that partition's HNSW index without pruning at plan time, and an
unfiltered search can be prepared once per connection. A search is one statement, one round trip, outside
a transaction: the HNSW settings are set on the connection only when they change (see _SETTINGS). The
caller passes the collection's row (the Store caches it); a collection dropped meanwhile shows up as an
undefined partition (UndefinedTable), on which the caller looks the name up again.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from embedpool.errors import InvalidArgument
from embedpool.store import collections
from embedpool.store.records import Candidate, CollectionInfo
from embedpool.store.writer import json_object

__all__ = [
    "EXACT_MAX_ROWS",
    "MAX_CANDIDATES",
    "candidates_query",
    "ef_search",
    "filtered_ef_search",
    "search_candidates",
]

MAX_CANDIDATES: Final = 10_000
_EF_MIN, _EF_MAX = 40, 1000  # 1000: pgvector's ceiling for hnsw.ef_search
# A filter the planner expects to match at most this many rows is answered exactly (see search_candidates).
EXACT_MAX_ROWS: Final = 2000


def ef_search(candidates: int) -> int:
    """The candidates asked for, at least 40, within pgvector's bounds.

    The caller reranks the candidates exactly and keeps its top k (a quarter or less of them), so the
    candidate list itself is the recall headroom: on 100k x 384 (bench/search.py) ef_search 40 for 40
    candidates gives recall@10 >= 0.99 after the rerank, and doubling ef_search halves the queries/s for
    less than half a point of recall. Below `candidates` the graph walk would return fewer rows than asked.
    """
    return min(_EF_MAX, max(_EF_MIN, candidates))


def filtered_ef_search(candidates: int, matching: float, rows: float) -> int:
    """ef_search for a filter expected to match `matching` of `rows` rows: 40 / selectivity, capped at 1000.

    pgvector applies the filter to the rows the graph walk yields, so ef_search nearest rows hold only about
    ef_search * selectivity matching ones; the iterative scan then fills the rest from farther, less exactly
    ordered batches, and recall drops (100k x 384, 10% filter: recall@10 0.89 at ef_search 40). Walking
    40 / selectivity puts as many matching rows in the first batch as an unfiltered walk at ef_search 40
    finds (recall@10 0.97); more candidates than that come from the iterative scan, as before.
    """
    if matching <= 0 or rows <= 0:
        return ef_search(candidates)
    return min(_EF_MAX, max(ef_search(candidates), math.ceil(_EF_MIN * rows / matching)))


def candidates_query(info: CollectionInfo, *, filtered: bool, max_distance: bool, exact: bool = False) -> sql.Composed:
    """The search SELECT. Parameters: [filter jsonb], query vector, limit, [max distance].

    `exact` (filtered only): distances of every matching row, sorted; the OFFSET 0 fence keeps the ORDER BY
    out of the subquery, so the HNSW index cannot serve it and the planner fetches the matches through the
    GIN index on metadata (or a seq scan) and keeps the top `limit` in a heap sort.
    """
    order_by = sql.SQL("(embedding::vector({dim})) {op} %(query)s").format(
        dim=sql.Literal(info.dim), op=collections.METRICS[info.metric].operator
    )
    parts = {
        "order_by": order_by,
        "partition": sql.Identifier(collections.partition_name(info)),
        "where": sql.SQL("WHERE metadata @> %(filter)s" if filtered else ""),
        "cut": sql.SQL("WHERE distance <= %(max_distance)s" if max_distance else ""),
    }
    if exact and filtered:
        return sql.SQL(
            "SELECT id, text, metadata, embedding, distance FROM ("
            "SELECT id, text, metadata, embedding, {order_by} AS distance FROM {partition} {where} OFFSET 0"
            ") AS c {cut} ORDER BY distance LIMIT %(limit)s"
        ).format(**parts)
    # The distance cut goes outside the LIMIT subquery: inside, the planner could not use the index order.
    # The outer ORDER BY restores exact order, which relaxed_order iterative scans do not guarantee.
    return sql.SQL(
        "SELECT id, text, metadata, embedding, distance FROM ("
        "SELECT id, text, metadata, embedding, {order_by} AS distance FROM {partition} {where}"
        " ORDER BY {order_by} LIMIT %(limit)s) AS c {cut} ORDER BY distance"
    ).format(**parts)


async def search_candidates(
    conn: AsyncConnection[Any],
    info: CollectionInfo,
    query: NDArray[np.float32],
    *,
    candidates: int,
    filter: dict[str, Any] | None = None,
    max_distance: float | None = None,
) -> list[Candidate]:
    """Up to `candidates` approximate nearest rows of `info`'s partition; UndefinedTable if it was dropped."""
    if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= MAX_CANDIDATES:
        raise InvalidArgument(f"candidates must be an integer in 1..{MAX_CANDIDATES}, got {candidates!r}")
    params: dict[str, Any] = {"limit": candidates, "query": _query_vector(query, info)}
    if filter:
        json_object(filter, "filter")
        params["filter"] = Jsonb(filter)
    elif filter is not None:
        json_object(filter, "filter")  # {} filters nothing; anything else that is falsy is a type error
    if max_distance is not None:
        params["max_distance"] = float(max_distance)
    ef, exact = ef_search(candidates), False
    if "filter" in params:
        # A filtered search first asks the planner how many rows the filter matches (its estimate from the
        # column statistics: one EXPLAIN, no execution, well under a millisecond against tens of ms for the
        # search). Few matches (<= EXACT_MAX_ROWS): read them all and sort exactly: exact, and cheaper than
        # a graph walk that would have to pass ~candidates/selectivity rows. More: walk the graph with
        # ef_search scaled by the selectivity (filtered_ef_search). 100k x 384: exact over 1% (1k rows) is
        # fast, over 10% (10k rows, every heap page) ~3x slower than the scaled walk.
        matching, rows = await _estimate(conn, info, params["filter"])
        exact = matching <= EXACT_MAX_ROWS
        ef = filtered_ef_search(candidates, matching, rows)
    # Without an iterative scan the index yields at most ef_search rows, and a selective filter then leaves
    # fewer than asked. relaxed_order keeps scanning the graph until enough rows pass (pgvector >= 0.8).
    iterative = "relaxed_order" if "filter" in params or candidates > ef else "off"
    query_sql = candidates_query(info, filtered="filter" in params, max_distance=max_distance is not None, exact=exact)
    if _settings.get(conn) != (ef, iterative):
        await conn.execute(_SETTINGS, (str(ef), iterative))
        _settings[conn] = (ef, iterative)
    # Unfiltered searches are prepared (psycopg does so after a few executions). A filtered one is planned per
    # call: a generic plan cannot see the filter's selectivity, and guesses a seq scan for any filter.
    cur = await conn.cursor(binary=True).execute(query_sql, params, prepare=False if "filter" in params else None)
    return [Candidate(*row) for row in await cur.fetchall()]


# Session settings, not SET LOCAL: a search is then one statement with no transaction around it, and a
# connection's settings change only when the candidate count does. Only searches read these settings, and
# each makes sure of them first; the cache entry goes with the connection object.
_SETTINGS = "SELECT set_config('hnsw.ef_search', %s, false), set_config('hnsw.iterative_scan', %s, false)"
_settings: weakref.WeakKeyDictionary[AsyncConnection[Any], tuple[int, str]] = weakref.WeakKeyDictionary()


async def _estimate(conn: AsyncConnection[Any], info: CollectionInfo, filter: Jsonb) -> tuple[float, float]:
    """The planner's estimates of the rows matching `filter` and of all rows in `info`'s partition."""
    partition = sql.Identifier(collections.partition_name(info))
    query = sql.SQL(
        "EXPLAIN (FORMAT JSON) SELECT 1 FROM {p} WHERE metadata @> %(filter)s UNION ALL SELECT 1 FROM {p}"
    ).format(p=partition)
    cur = await conn.execute(query, {"filter": filter}, prepare=False)
    row = await cur.fetchone()
    assert row is not None
    matching, total = (float(plan["Plan Rows"]) for plan in row[0][0]["Plan"]["Plans"])
    return matching, total


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
