"""Search: candidates from a collection's HNSW index, reranked exactly, the top k with their documents.

The query names the collection's partition (documents_c<id>), so the planner matches the ORDER BY
expression (embedding::vector(dim)) to that partition's HNSW index without pruning at plan time, and an
unfiltered search can be prepared once per connection. A search is one statement, one round trip, outside
a transaction: the HNSW settings are set on the connection only when they change (see _SETTINGS). The
caller passes the collection's row (the Store caches it); a collection dropped meanwhile shows up as an
undefined partition (UndefinedTable), on which the caller looks the name up again.

The rerank depends on what the index holds. A `vector` index walks the graph on the stored float32 vectors,
so the distances of its candidates are already exact: Postgres cuts them to the top k and only k rows travel
(bench/search.py `top_k_in_postgres_vs_rerank_all_candidates_qps`: 1.5x the queries/s of shipping all 100
candidates to rerank them here, for the same hits). A `halfvec`
index ranks by half-precision distances: only the candidates' ids and float32 vectors travel, the Rust
extension reranks them exactly (`topk_cosine`), and a second statement fetches the top k's documents.

A collection's storage (store.storage) decides the rest: float16 storage walks a halfvec index over the
stored half-precision values, binary storage a Hamming index over the stored bits; both fetch all the
candidates and rerank them in the same statement, on the stored half-precision values (exact for what is
stored) or the float32 vectors kept beside the bits, so again only k rows travel.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from embedpool import _native
from embedpool.errors import InvalidArgument
from embedpool.store import collections
from embedpool.store import storage as storages
from embedpool.store.records import CollectionInfo, Hit
from embedpool.store.writer import json_object

__all__ = [
    "BINARY_OVERSAMPLE",
    "DEFAULT_MIN_CANDIDATES",
    "EXACT_MAX_ROWS",
    "MAX_CANDIDATES",
    "default_candidates",
    "documents_query",
    "ef_search",
    "filtered_ef_search",
    "search",
    "search_query",
]

MAX_CANDIDATES: Final = 10_000
# On 100k x 384 (bench/search.py) 100 candidates give recall@10 0.99; 40 give 0.98 at 1.3x the queries/s.
DEFAULT_MIN_CANDIDATES: Final = 100
_EF_MIN, _EF_MAX = 40, 1000  # 1000: pgvector's ceiling for hnsw.ef_search
# Binary storage ranks candidates by Hamming distance over sign bits, a coarse order (few distinct values, many
# ties): it takes this many times the default candidates for the exact rerank. On 4000 docstring passages x 384
# (bench/storage.py) recall@10 was 0.94 at 100 candidates and 0.996 at 400, at 1.5x the latency.
BINARY_OVERSAMPLE: Final = 4
# A filter the planner expects to match at most this many rows is answered exactly (see search).
EXACT_MAX_ROWS: Final = 2000


def ef_search(candidates: int) -> int:
    """The candidates asked for, at least 40, within pgvector's bounds.

    The search keeps the exact top k of the candidates (a quarter or less of them), so the candidate list
    itself is the recall headroom: on 100k x 384 (bench/search.py) recall@10 is 0.98 at 40 and 0.99 at
    100. Below `candidates` the graph walk would return fewer rows than asked.
    """
    return min(_EF_MAX, max(_EF_MIN, candidates))


def filtered_ef_search(candidates: int, matching: float, rows: float) -> int:
    """ef_search for a filter expected to match `matching` of `rows` rows: the unfiltered ef_search (the
    candidates, at least 40) / selectivity, capped at 1000.

    pgvector applies the filter to the rows the graph walk yields, so ef_search nearest rows hold only about
    ef_search * selectivity matching ones. Scaled so, the walk's first batch, which comes in exact order,
    holds about as many matching rows as an unfiltered search has candidates, and its first k matching rows
    are the top k of those: the search then takes only k rows. Continuing with the iterative scan's later,
    loosely ordered batches adds a little recall at a high price (100k x 384, 10% filter, 100 candidates:
    ef_search 1000 taking k rows gave recall@10 0.994 at 46 queries/s; ef_search 400 continued up to 100
    rows, 0.995 at 24). Where the cap keeps the first batch short of the candidates, the scan continues.
    """
    if matching <= 0 or rows <= 0:
        return ef_search(candidates)
    return min(_EF_MAX, max(ef_search(candidates), math.ceil(ef_search(candidates) * rows / matching)))


def default_candidates(k: int) -> int:
    """Candidates for a search that does not say: 4 * k, at least DEFAULT_MIN_CANDIDATES."""
    return min(MAX_CANDIDATES, max(DEFAULT_MIN_CANDIDATES, 4 * k))


def search_query(info: CollectionInfo, *, filtered: bool, max_distance: bool, exact: bool = False) -> sql.Composed:
    """The SELECT of a search. Parameters: [filter jsonb], query vector, fetch, k, [max distance].

    Rows: id, text, metadata, embedding, distance, nearest first. The distance is always computed on the
    stored float32 vector (exact); the ORDER BY that walks the graph spells the index expression.
    - vector index: the `fetch` nearest rows of the walk, cut to the k nearest. The walk's distances are the
      exact ones, so this is the exact rerank of its candidates, done where the rows are. Without a filter or
      an iterative scan the walk yields its ef_search candidates already in exact order, and `fetch` = k.
    - halfvec index: the `fetch` candidates' id, embedding and content hash only; the caller reranks them
      exactly and fetches the top k's documents (`documents_query`).
    - `exact` (filtered only): every matching row, sorted; the OFFSET 0 fence keeps the ORDER BY out of the
      subquery, so the index cannot serve it and the planner fetches the matches through the GIN index on
      metadata (or a seq scan) and keeps the top k in a heap sort.
    """
    metric = collections.METRICS[info.metric]
    stored = sql.SQL("({value}::vector({dim}))").format(
        value=sql.SQL(storages.STORAGES[info.storage].float_value), dim=sql.Literal(info.dim)
    )
    exact_distance = sql.SQL("{stored} {op} %(query)s").format(stored=stored, op=metric.operator)
    if collections.index_type(info) == "bit":
        walk = sql.SQL("{expression} <~> binary_quantize(%(query)s::vector({dim}))::bit({dim})").format(
            expression=collections.index_expression(info), dim=sql.Literal(info.dim)
        )
    else:
        walk = sql.SQL("{expression} {op} %(query)s::{type}({dim})").format(
            expression=collections.index_expression(info),
            op=metric.operator,
            type=sql.SQL(collections.index_type(info)),
            dim=sql.Literal(info.dim),
        )
    parts = {
        "stored": stored,
        "exact_distance": exact_distance,
        "walk": walk,
        "partition": sql.Identifier(collections.partition_name(info)),
        "where": sql.SQL("WHERE metadata @> %(filter)s" if filtered else ""),
        "cut": sql.SQL("WHERE distance <= %(max_distance)s" if max_distance else ""),
    }
    if exact and filtered:
        return sql.SQL(
            "SELECT id, text, metadata, embedding, distance FROM ("
            "SELECT id, text, metadata, {stored} AS embedding, {exact_distance} AS distance FROM {partition} {where}"
            " OFFSET 0"
            ") AS c {cut} ORDER BY distance LIMIT %(k)s"
        ).format(**parts)
    if info.hnsw_halfvec:  # only with float32 storage (collections.create)
        return sql.SQL(
            "SELECT id, embedding, content_hash FROM {partition} {where} ORDER BY {walk} LIMIT %(fetch)s"
        ).format(**parts)
    # The distance cut goes outside the LIMIT subquery: inside, the planner could not use the index order.
    # The outer ORDER BY restores exact order, which relaxed_order iterative scans do not guarantee.
    return sql.SQL(
        "SELECT id, text, metadata, embedding, distance FROM ("
        "SELECT id, text, metadata, {stored} AS embedding, {exact_distance} AS distance FROM {partition} {where}"
        " ORDER BY {walk} LIMIT %(fetch)s) AS c {cut} ORDER BY distance LIMIT %(k)s"
    ).format(**parts)


@functools.lru_cache(maxsize=1024)
def _search_sql(info: CollectionInfo, *, filtered: bool, max_distance: bool, exact: bool) -> bytes:
    """search_query as bytes, composed once per collection and shape: composing costs ~0.1 ms, a search ~2."""
    return search_query(info, filtered=filtered, max_distance=max_distance, exact=exact).as_bytes(None)


def documents_query(info: CollectionInfo) -> sql.Composed:
    """Text, metadata and content hash of the rows with the given ids (parameter: ids text[])."""
    return sql.SQL("SELECT id, text, metadata, content_hash FROM {} WHERE id = ANY(%s)").format(
        sql.Identifier(collections.partition_name(info))
    )


def _count(value: object, what: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise InvalidArgument(f"{what} must be an integer in 1..{high}, got {value!r}")
    return value


async def search(
    conn: AsyncConnection[Any],
    info: CollectionInfo,
    query: NDArray[np.float32],
    *,
    k: int,
    candidates: int | None = None,
    filter: dict[str, Any] | None = None,
    max_distance: float | None = None,
) -> list[Hit]:
    """The k nearest documents of `info`'s partition among `candidates` from its HNSW index, nearest first,
    with exact distances; UndefinedTable if the partition was dropped."""
    _count(k, "k", MAX_CANDIDATES)
    if candidates is None:
        oversample = BINARY_OVERSAMPLE if info.storage == "binary" else 1
        candidates = min(MAX_CANDIDATES, default_candidates(k) * oversample)
    candidates = max(k, _count(candidates, "candidates", MAX_CANDIDATES))
    vector = _query_vector(query, info)
    params: dict[str, Any] = {"k": k, "query": vector}
    if filter:
        json_object(filter, "filter")
        params["filter"] = Jsonb(filter)
    elif filter is not None:
        json_object(filter, "filter")  # {} filters nothing; anything else that is falsy is a type error
    if max_distance is not None:
        params["max_distance"] = float(max_distance)
    ef, exact, first_batch = ef_search(candidates), False, 0.0
    if "filter" in params:
        # A filtered search first asks the planner how many rows the filter matches (its estimate from the
        # column statistics: one EXPLAIN, no execution, well under a millisecond against tens of ms for the
        # search). Few matches (<= EXACT_MAX_ROWS): read them all and sort exactly: exact, and cheaper than
        # a graph walk that would have to pass ~candidates/selectivity rows. More: walk the graph with
        # ef_search scaled by the selectivity (filtered_ef_search). 100k x 384: exact over 1% (1k rows) is
        # fast, over 10% (10k rows, every heap page) ~3x slower than the scaled walk.
        matching, total = await _estimate(conn, info, params["filter"])
        exact = matching <= EXACT_MAX_ROWS
        ef = filtered_ef_search(candidates, matching, total)
        # Matching rows expected in the walk's first, exactly ordered batch.
        first_batch = ef * matching / total if total > 0 else 0.0
    # Without an iterative scan the index yields at most ef_search rows, and a selective filter then leaves
    # fewer than asked. relaxed_order keeps scanning the graph until enough rows pass (pgvector >= 0.8).
    iterative = "relaxed_order" if "filter" in params or candidates > ef else "off"
    # Where the walk's first batch (in exact order) holds the candidates, its first k rows are their exact top k.
    # Only a float32 `vector` index walks on the exact distances; float16 and binary storage fetch all the
    # candidates and rerank them in the query (halfvec or Hamming order is not the exact one).
    straight = collections.index_type(info) == "vector" and (iterative == "off" or first_batch >= candidates)
    params["fetch"] = k if straight else candidates
    if not exact and _settings.get(conn) != (ef, iterative):
        await conn.execute(_SETTINGS, (str(ef), iterative))
        _settings[conn] = (ef, iterative)
    query_sql = _search_sql(info, filtered="filter" in params, max_distance=max_distance is not None, exact=exact)
    # Unfiltered searches are prepared (psycopg does so after a few executions). A filtered one is planned per
    # call: a generic plan cannot see the filter's selectivity, and guesses a seq scan for any filter.
    cur = await conn.cursor(binary=True).execute(query_sql, params, prepare=False if "filter" in params else None)
    rows = await cur.fetchall()
    if exact or not info.hnsw_halfvec:
        return [Hit(*row) for row in rows]
    return await _rerank(conn, info, vector, rows, k, max_distance)


async def _rerank(
    conn: AsyncConnection[Any],
    info: CollectionInfo,
    query: NDArray[np.float32],
    candidates: list[tuple[Any, ...]],
    k: int,
    max_distance: float | None,
) -> list[Hit]:
    """The exact top k of a halfvec index's candidates (id, float32 embedding, content hash), with their
    documents. A candidate changed or deleted between the two statements is left out rather than returned
    with a text its vector does not belong to."""
    if not candidates:
        return []
    order, scores = _native.topk_cosine(query[None, :], np.stack([row[1] for row in candidates]), k)
    top = [(candidates[j], 1.0 - score) for j, score in zip(order[0].tolist(), scores[0].tolist(), strict=True)]
    if max_distance is not None:
        top = [(row, distance) for row, distance in top if distance <= max_distance]
    cur = await conn.cursor(binary=True).execute(documents_query(info), ([row[0] for row, _ in top],))
    documents = {doc_id: (text, metadata, digest) for doc_id, text, metadata, digest in await cur.fetchall()}
    hits = []
    for (doc_id, embedding, digest), distance in top:
        document = documents.get(doc_id)
        if document is not None and bytes(document[2]) == bytes(digest):
            hits.append(Hit(doc_id, document[0], document[1], embedding, distance))
    return hits


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
