"""Collections: a row in `collections` plus a partition of `documents` with its own fixed-dim HNSW index.

Identifiers are built from the numeric collection id, never from the user's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from psycopg import AsyncConnection, sql
from psycopg.rows import class_row

from embedpool.errors import AlreadyExists, InvalidArgument, NotFound
from embedpool.store import storage as storages
from embedpool.store.records import CollectionInfo, CollectionStats, HnswOptions

__all__ = [
    "MAX_DIM",
    "METRICS",
    "HnswOptions",
    "Metric",
    "build_index",
    "check_name",
    "create",
    "create_index_sql",
    "drop",
    "drop_index_if_empty",
    "get",
    "has_index",
    "index_expression",
    "index_name",
    "index_opclass",
    "index_type",
    "list_all",
    "lookup",
    "partition_name",
    "stats",
]

MAX_DIM: Final = 2000  # pgvector's HNSW limit for `vector`
MAX_NAME_CHARS: Final = 255


@dataclass(frozen=True, slots=True)
class Metric:
    """How one metric is spelt in SQL: the distance operator and the HNSW operator class."""

    operator: sql.SQL
    opclass: str
    """Without the type: vector_<opclass> or halfvec_<opclass>."""


METRICS: Final = {
    "cosine": Metric(sql.SQL("<=>"), "cosine_ops"),
    "l2": Metric(sql.SQL("<->"), "l2_ops"),
    "ip": Metric(sql.SQL("<#>"), "ip_ops"),
}

# A CollectionInfo's stored fields, once: bare, and qualified for queries that join `collections c`.
_FIELDS = (
    "id",
    "name",
    "model",
    "dim",
    "metric",
    "created_at",
    "hnsw_m",
    "hnsw_ef_construction",
    "hnsw_halfvec",
    "storage",
)
_COLUMNS = sql.SQL(", ").join(map(sql.Identifier, _FIELDS))
_COLUMNS_OF_C = sql.SQL(", ").join(sql.Identifier("c", f) for f in _FIELDS)


def partition_name(info: CollectionInfo) -> str:
    return f"documents_c{info.id}"


def index_name(info: CollectionInfo) -> str:
    return f"documents_c{info.id}_hnsw"


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidArgument("collection name must be a non-empty string")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(f"collection name is longer than {MAX_NAME_CHARS} characters")
    if "\x00" in name:
        raise InvalidArgument("collection name contains a NUL character")
    try:
        name.encode()
    except UnicodeEncodeError:
        raise InvalidArgument("collection name is not valid Unicode (lone surrogate)") from None
    return name


async def create(
    conn: AsyncConnection[Any],
    name: str,
    *,
    model: str,
    dim: int,
    metric: str,
    hnsw: HnswOptions | None = None,
    storage: str = storages.DEFAULT,
) -> CollectionInfo:
    """Idempotent for the same definition (index options and storage included; None: the defaults);
    AlreadyExists when the name is taken by a different one."""
    hnsw = hnsw or HnswOptions()
    storages.check(storage)
    check_name(name)
    if not isinstance(model, str) or not model or "\x00" in model:
        raise InvalidArgument("model must be a non-empty string")
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
        raise InvalidArgument(f"dim must be an integer in 1..{MAX_DIM}, got {dim!r}")
    if metric not in METRICS:
        raise InvalidArgument(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    if hnsw.halfvec and metric != "cosine":
        raise InvalidArgument("a halfvec index needs metric 'cosine': its candidates are reranked by cosine")
    if hnsw.halfvec and storage != "float32":
        raise InvalidArgument(f"index.halfvec is for float32 storage; {storage} storage has its own index type")
    async with conn.transaction():
        cur = conn.cursor(row_factory=class_row(CollectionInfo))
        # ON CONFLICT makes a concurrent create of the same name wait for the first one, then see its row.
        await cur.execute(
            sql.SQL(
                "INSERT INTO collections (name, model, dim, metric, hnsw_m, hnsw_ef_construction, hnsw_halfvec,"
                " storage) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING {}"
            ).format(_COLUMNS),
            (name, model, dim, metric, hnsw.m, hnsw.ef_construction, hnsw.halfvec, storage),
        )
        created = await cur.fetchone()
        if created is None:
            existing = await lookup(conn, name)
            existing_hnsw = existing.hnsw
            definition = (existing.model, existing.dim, existing.metric, existing_hnsw, existing.storage)
            if definition != (model, dim, metric, hnsw, storage):
                raise AlreadyExists(
                    f"collection '{name}' already exists with model={existing.model!r}, dim={existing.dim},"
                    f" metric={existing.metric!r}, hnsw m={existing_hnsw.m},"
                    f" ef_construction={existing_hnsw.ef_construction}, halfvec={existing_hnsw.halfvec},"
                    f" storage={existing.storage}"
                )
            return existing
        await _create_partition(conn, created, hnsw)
        return created


async def _create_partition(conn: AsyncConnection[Any], info: CollectionInfo, hnsw: HnswOptions) -> None:
    await conn.execute(
        sql.SQL("CREATE TABLE {part} PARTITION OF documents ({checks}) FOR VALUES IN ({id})").format(
            part=sql.Identifier(partition_name(info)),
            checks=storages.constraints(storages.check(info.storage), info.dim),
            id=sql.Literal(info.id),
        )
    )
    await conn.execute(create_index_sql(info, hnsw))


def index_type(info: CollectionInfo) -> str:
    """The type the collection's HNSW index holds: `vector` (float32), `halfvec` or `bit` (see store.storage)."""
    if info.storage == "float32":
        return "halfvec" if info.hnsw_halfvec else "vector"
    return storages.STORAGES[info.storage].index_type


def index_expression(info: CollectionInfo) -> sql.Composed:
    """The indexed expression; a query's ORDER BY must spell it the same for the planner to use the index."""
    return sql.SQL("({column}::{type}({dim}))").format(
        column=sql.Identifier(storages.STORAGES[info.storage].column),
        type=sql.SQL(index_type(info)),
        dim=sql.Literal(info.dim),
    )


def index_opclass(info: CollectionInfo) -> str:
    """Bits are searched by Hamming distance whatever the metric: the rerank uses the metric."""
    if index_type(info) == "bit":
        return "bit_hamming_ops"
    return f"{index_type(info)}_{METRICS[info.metric].opclass}"


def create_index_sql(info: CollectionInfo, hnsw: HnswOptions) -> sql.Composed:
    return sql.SQL(
        "CREATE INDEX IF NOT EXISTS {index} ON {part} USING hnsw ({expression} {opclass})"
        " WITH (m = {m}, ef_construction = {ef_construction})"
    ).format(
        index=sql.Identifier(index_name(info)),
        part=sql.Identifier(partition_name(info)),
        expression=index_expression(info),
        opclass=sql.SQL(index_opclass(info)),
        m=sql.Literal(hnsw.m),
        ef_construction=sql.Literal(hnsw.ef_construction),
    )


async def has_index(conn: AsyncConnection[Any], info: CollectionInfo) -> bool:
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (index_name(info),))
    row = await cur.fetchone()
    assert row is not None
    return bool(row[0])


async def drop_index_if_empty(conn: AsyncConnection[Any], name: str) -> bool:
    """Drop the HNSW index when the collection has no documents; whether the collection is now without one.

    Inserting into the graph row by row costs far more than building it once over the loaded rows."""
    async with conn.transaction():
        info = await lookup(conn, name, lock=True)
        part = sql.Identifier(partition_name(info))
        # The table lock first: a concurrent writer either committed before (and we see its rows) or waits.
        await conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(part))
        cur = await conn.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(part))
        row = await cur.fetchone()
        assert row is not None
        if not row[0]:
            await conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(index_name(info))))
        return not await has_index(conn, info)


async def build_index(
    conn: AsyncConnection[Any], name: str, *, maintenance_work_mem: str, parallel_workers: int | None
) -> None:
    """Create the collection's HNSW index unless it exists, with the given build memory and workers."""
    async with conn.transaction():
        info = await lookup(conn, name, lock=True)
        await conn.execute("SELECT set_config('statement_timeout', '0', true)")  # a build may take minutes
        await conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (maintenance_work_mem,))
        if parallel_workers is not None:
            await conn.execute(
                "SELECT set_config('max_parallel_maintenance_workers', %s, true)", (str(parallel_workers),)
            )
        await conn.execute(create_index_sql(info, info.hnsw))
        await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(partition_name(info))))


async def lookup(conn: AsyncConnection[Any], name: str, *, lock: bool = False) -> CollectionInfo:
    """The collection's row; with lock=True (inside a transaction) a concurrent drop waits for us."""
    check_name(name)
    cur = conn.cursor(row_factory=class_row(CollectionInfo))
    query = sql.SQL("SELECT {} FROM collections WHERE name = %s").format(_COLUMNS)
    if lock:
        query += sql.SQL(" FOR KEY SHARE")
    await cur.execute(query, (name,))
    info = await cur.fetchone()
    if info is None:
        raise NotFound(f"collection '{name}' does not exist")
    return info


async def get(conn: AsyncConnection[Any], name: str) -> CollectionInfo:
    """With the exact count: a scan of the collection's rows, so only where a caller asks for it."""
    cur = conn.cursor(row_factory=class_row(CollectionInfo))
    await cur.execute(
        sql.SQL(
            "SELECT {}, (SELECT count(*) FROM documents d WHERE d.collection_id = c.id) AS count"
            " FROM collections c WHERE c.name = %s"
        ).format(_COLUMNS_OF_C),
        (check_name(name),),
    )
    info = await cur.fetchone()
    if info is None:
        raise NotFound(f"collection '{name}' does not exist")
    return info


async def list_all(conn: AsyncConnection[Any]) -> list[CollectionInfo]:
    """Every collection by name, with an estimated count: Postgres' live-row statistic of its partition, which
    trails commits by up to a few seconds (falling back on the planner's estimate, 0 for one never counted)."""
    cur = conn.cursor(row_factory=class_row(CollectionInfo))
    await cur.execute(
        sql.SQL(
            "SELECT {}, coalesce(s.n_live_tup, greatest(p.reltuples, 0))::int8 AS count, true AS count_estimated"
            " FROM collections c"
            " LEFT JOIN pg_class p ON p.oid = to_regclass(quote_ident('documents_c' || c.id))"
            " LEFT JOIN pg_stat_user_tables s ON s.relid = p.oid"
            " ORDER BY c.name"
        ).format(_COLUMNS_OF_C)
    )
    return await cur.fetchall()


async def drop(conn: AsyncConnection[Any], name: str) -> None:
    async with conn.transaction():
        info = await lookup(conn, name)
        # Deleting the row first: it waits for upserts holding FOR KEY SHARE on it, then blocks new ones.
        await conn.execute("DELETE FROM collections WHERE id = %s", (info.id,))
        await conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(partition_name(info))))


async def stats(conn: AsyncConnection[Any], name: str) -> CollectionStats:
    info = await lookup(conn, name)
    part, index = partition_name(info), index_name(info)
    # to_regclass: NULL (size 0) while a bulk load runs without the index.
    cur = await conn.execute(
        sql.SQL(
            "SELECT (SELECT count(*) FROM {part}), coalesce(pg_relation_size(to_regclass(%(index)s)), 0),"
            " pg_total_relation_size(%(part)s::regclass) - coalesce(pg_relation_size(to_regclass(%(index)s)), 0),"
            " to_regclass(%(index)s) IS NOT NULL"
        ).format(part=sql.Identifier(part)),
        {"part": part, "index": index},
    )
    row = await cur.fetchone()
    assert row is not None
    return CollectionStats(count=row[0], index_bytes=row[1], table_bytes=row[2], indexed=row[3])
