"""The source side of a sync, in the user's database: the change queue, its triggers, and the worker's claim.

Schema `embedpool_sync` holds one queue for every sync of that database. A row trigger on the source table
appends the changed row's id (never its text) and notifies channel `embedpool_sync`; appending takes no lock
a worker holds, so the application's writes never wait for embedding.

A worker's batch is one transaction on the source database, held while it embeds and stores:
1. `claim` locks up to n pending entries (FOR UPDATE SKIP LOCKED: workers of every replica share the queue
   without a leader) and takes a transaction-level advisory lock per row id, skipping ids another worker holds:
   one row is never embedded by two workers at once, so an older text can never be stored after a newer one.
2. It locks every entry of its ids it can (more may have queued since) and reads those rows' current values,
   after the entries were committed: what it stores is at least as new as every change it will delete.
3. After the collection write has committed, `done` deletes exactly those entries, and the transaction commits.
A crash anywhere rolls the transaction back: the entries stay, and the next worker repeats the batch, which
the idempotent upsert turns into no visible change. A change made while a batch works queues a new entry that
this batch does not delete, so the row is embedded again with its newest text.

A TRUNCATE names no rows: a statement trigger marks the sync in `truncations`, and the worker that clears the
mark queues an entry for every id the collection holds (service.sync_worker). A batch's read of the table holds
a lock TRUNCATE waits for, so no batch stores a row from before a TRUNCATE after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from psycopg import AsyncConnection, sql

__all__ = [
    "CHANNEL",
    "Claimed",
    "QueueStats",
    "SourceRow",
    "SyncSource",
    "check",
    "claim",
    "describe_id",
    "done",
    "failed",
    "has_queue",
    "install",
    "queue_ids",
    "queue_stats",
    "read_rows",
    "take_truncation",
    "uninstall",
    "upgrade",
]

CHANNEL: Final = "embedpool_sync"

_SCHEMA: Final = """
CREATE SCHEMA IF NOT EXISTS embedpool_sync;
CREATE TABLE IF NOT EXISTS embedpool_sync.changes (
    seq         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sync        text        NOT NULL,
    row_id      text        NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts    integer     NOT NULL DEFAULT 0,
    not_before  timestamptz NOT NULL DEFAULT '-infinity',
    dead        boolean     NOT NULL DEFAULT false,
    error       text,
    failed_at   timestamptz
);
CREATE INDEX IF NOT EXISTS changes_pending ON embedpool_sync.changes (sync, seq) WHERE NOT dead;
CREATE INDEX IF NOT EXISTS changes_row ON embedpool_sync.changes (sync, row_id);
CREATE OR REPLACE FUNCTION embedpool_sync.capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    old_id text;
    new_id text;
BEGIN
    -- TG_ARGV: the sync's name, the id column's name. A row's id is read by name so that one function
    -- serves every table; an update that changes the id queues both.
    IF TG_OP <> 'INSERT' THEN
        old_id := to_jsonb(OLD) ->> TG_ARGV[1];
        INSERT INTO embedpool_sync.changes (sync, row_id) VALUES (TG_ARGV[0], old_id);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_id := to_jsonb(NEW) ->> TG_ARGV[1];
        IF new_id IS DISTINCT FROM old_id THEN
            INSERT INTO embedpool_sync.changes (sync, row_id) VALUES (TG_ARGV[0], new_id);
        END IF;
    END IF;
    PERFORM pg_notify('embedpool_sync', TG_ARGV[0]);  -- sent once per transaction and sync, at commit
    RETURN NULL;
END
$$;
-- TRUNCATE fires no row trigger and names no rows: a statement trigger marks the sync, and a worker then
-- queues every id its collection holds, each stored again or removed as the table now has it.
CREATE TABLE IF NOT EXISTS embedpool_sync.truncations (sync text PRIMARY KEY);
CREATE OR REPLACE FUNCTION embedpool_sync.capture_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO embedpool_sync.truncations (sync) VALUES (TG_ARGV[0]) ON CONFLICT DO NOTHING;
    PERFORM pg_notify('embedpool_sync', TG_ARGV[0]);
    RETURN NULL;
END
$$;
"""
# Two-key advisory locks: this namespace, then a hash of sync and row id (a collision only makes a worker
# skip a row another holds, for one batch).
_LOCK_SPACE: Final = 0x6570_7379  # "epsy"


@dataclass(frozen=True, slots=True)
class SyncSource:
    """What a sync reads: `schema.table`, its id column (and that column's type), the text expression, the
    metadata columns and an optional filter (rows not matching it are kept out of the collection)."""

    name: str
    schema: str
    table: str
    id_column: str
    id_type: str
    text_expr: str
    metadata_columns: tuple[str, ...] = ()
    where_expr: str = ""

    @property
    def relation(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table)

    @property
    def trigger(self) -> sql.Identifier:
        return sql.Identifier(f"embedpool_sync_{self.name}")

    @property
    def truncate_trigger_name(self) -> str:
        # A short prefix: names are at most 48 characters and Postgres cuts identifiers at 63 bytes.
        return f"embedpool_tr_{self.name}"


@dataclass(frozen=True, slots=True)
class Claimed:
    """The row ids a batch owns, the queue entries it will delete, and each id's most attempts so far."""

    row_ids: list[str]
    seqs: dict[str, list[int]]
    """By row id: the entries this batch locked."""
    attempts: dict[str, int]

    @property
    def all_seqs(self) -> list[int]:
        return [seq for seqs in self.seqs.values() for seq in seqs]


@dataclass(frozen=True, slots=True)
class SourceRow:
    row_id: str
    text: str | None
    metadata: dict[str, Any]
    included: bool
    """False when the row fails the sync's filter: it is removed from the collection like a deleted one."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    pending_rows: int
    pending_changes: int
    oldest_pending_s: float
    dead_rows: int
    last_error: str
    last_error_row: str


async def describe_id(conn: AsyncConnection[Any], schema: str, table: str, column: str) -> str | None:
    """The id column's type as format_type() names it; None if the table or column does not exist."""
    cur = await conn.execute(
        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attname = %s AND a.attnum > 0 AND NOT a.attisdropped"
        " AND c.relkind IN ('r', 'p')",
        (schema, table, column),
    )
    row = await cur.fetchone()
    return None if row is None else str(row[0])


def _values(source: SyncSource) -> sql.Composed:
    """The select list a worker reads: id, text, metadata (jsonb), whether the row passes the filter."""
    metadata = sql.SQL("jsonb_build_object({})").format(
        sql.SQL(", ").join(sql.SQL("{}, {}").format(sql.Literal(c), sql.Identifier(c)) for c in source.metadata_columns)
    )
    where = sql.SQL(source.where_expr) if source.where_expr else sql.SQL("true")
    return sql.SQL("{id}::text, ({text})::text, {metadata}, coalesce(({where})::boolean, false)").format(
        id=sql.Identifier(source.id_column),
        text=sql.SQL(source.text_expr),  # an admin's expression, checked by `check`
        metadata=metadata,
        where=where,
    )


async def check(conn: AsyncConnection[Any], source: SyncSource) -> None:
    """Plans the worker's read once, reading no row: a bad expression, column or filter fails here, at create
    time, with the database's error."""
    await conn.execute(sql.SQL("SELECT {} FROM {} LIMIT 0").format(_values(source), source.relation))


async def install(conn: AsyncConnection[Any], source: SyncSource) -> int:
    """In the caller's transaction: the queue schema, the source table's trigger, and one entry per existing
    row (the backfill); returns how many. CREATE TRIGGER locks out writers until the transaction commits, so
    no change falls between the backfill and the trigger."""
    await _schema(conn)
    await conn.execute(
        sql.SQL(
            "CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE OR DELETE ON {relation}"
            " FOR EACH ROW EXECUTE FUNCTION embedpool_sync.capture({name}, {column})"
        ).format(
            trigger=source.trigger,
            relation=source.relation,
            name=sql.Literal(source.name),
            column=sql.Literal(source.id_column),
        )
    )
    await _truncate_trigger(conn, source)
    cur = await conn.execute(
        sql.SQL("INSERT INTO embedpool_sync.changes (sync, row_id) SELECT {name}, {id}::text FROM {relation}").format(
            name=sql.Literal(source.name), id=sql.Identifier(source.id_column), relation=source.relation
        )
    )
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, source.name))
    return cur.rowcount


async def _schema(conn: AsyncConnection[Any]) -> None:
    # Serialized: CREATE OR REPLACE FUNCTION from two sessions at once fails with "tuple concurrently updated".
    await conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_SPACE,))
    await conn.execute(_SCHEMA)  # a constant


async def _truncate_trigger(conn: AsyncConnection[Any], source: SyncSource) -> None:
    await conn.execute(
        sql.SQL(
            "CREATE TRIGGER {trigger} AFTER TRUNCATE ON {relation}"
            " FOR EACH STATEMENT EXECUTE FUNCTION embedpool_sync.capture_truncate({name})"
        ).format(
            trigger=sql.Identifier(source.truncate_trigger_name),
            relation=source.relation,
            name=sql.Literal(source.name),
        )
    )


async def upgrade(conn: AsyncConnection[Any], source: SyncSource) -> bool:
    """In the caller's transaction: what a sync installed by an older embedpool lacks (the TRUNCATE capture).
    Returns whether anything was added. A source table that is gone gets no trigger."""
    relation = source.relation.as_string(conn)
    cur = await conn.execute(
        "SELECT to_regclass('embedpool_sync.truncations') IS NOT NULL, to_regclass(%s) IS NOT NULL,"
        " EXISTS (SELECT FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = %s)",
        (relation, relation, source.truncate_trigger_name),
    )
    row = await cur.fetchone()
    assert row is not None
    has_schema, table_exists, has_trigger = row
    if not has_schema:
        await _schema(conn)
    if table_exists and not has_trigger:
        await _truncate_trigger(conn, source)
    return not has_schema or (table_exists and not has_trigger)


async def take_truncation(conn: AsyncConnection[Any], sync: str) -> bool:
    """In the batch's transaction: whether the source table was truncated since a worker last looked (the mark
    is cleared when the transaction commits; a concurrent worker waits for it, then finds none)."""
    cur = await conn.execute("DELETE FROM embedpool_sync.truncations WHERE sync = %s RETURNING sync", (sync,))
    return await cur.fetchone() is not None


async def queue_ids(conn: AsyncConnection[Any], sync: str, row_ids: Sequence[str]) -> None:
    """Queues a change of each of `row_ids`, as the row trigger would."""
    await conn.execute(
        "INSERT INTO embedpool_sync.changes (sync, row_id) SELECT %s, unnest(%s::text[])", (sync, list(row_ids))
    )


async def uninstall(conn: AsyncConnection[Any], source: SyncSource) -> None:
    """Removes the sync's triggers, queue entries and mark (the schema stays for the database's other syncs)."""
    await conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(source.trigger, source.relation))
    await conn.execute(
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(source.truncate_trigger_name), source.relation)
    )
    await conn.execute("DELETE FROM embedpool_sync.changes WHERE sync = %s", (source.name,))
    if await _exists(conn, "embedpool_sync.truncations"):  # an older embedpool's install has none
        await conn.execute("DELETE FROM embedpool_sync.truncations WHERE sync = %s", (source.name,))


async def _exists(conn: AsyncConnection[Any], relation: str) -> bool:
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (relation,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def claim(conn: AsyncConnection[Any], sync: str, limit: int) -> Claimed | None:
    """In the batch's transaction: up to `limit` pending entries' row ids that no other worker holds, every
    entry of those ids that can be locked now, and their attempts. None when there is nothing to do."""
    cur = await conn.execute(
        "SELECT DISTINCT row_id FROM (SELECT row_id FROM embedpool_sync.changes"
        " WHERE sync = %s AND NOT dead AND not_before <= now() ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED) c",
        (sync, limit),
    )
    candidates = [r for (r,) in await cur.fetchall()]
    if not candidates:
        return None
    cur = await conn.execute(
        "SELECT r FROM unnest(%s::text[]) r WHERE pg_try_advisory_xact_lock(%s, hashtext(%s || '/' || r))",
        (candidates, _LOCK_SPACE, sync),
    )
    owned = [r for (r,) in await cur.fetchall()]
    if not owned:
        return None
    cur = await conn.execute(
        "SELECT seq, row_id, attempts FROM embedpool_sync.changes WHERE sync = %s AND row_id = ANY(%s)"
        " FOR UPDATE SKIP LOCKED",
        (sync, owned),
    )
    seqs: dict[str, list[int]] = {}
    attempts: dict[str, int] = {}
    for seq, row_id, tries in await cur.fetchall():
        seqs.setdefault(row_id, []).append(int(seq))
        attempts[row_id] = max(attempts.get(row_id, 0), int(tries))
    return Claimed(owned, seqs, attempts)


async def read_rows(conn: AsyncConnection[Any], source: SyncSource, row_ids: Sequence[str]) -> dict[str, SourceRow]:
    """The current values of the rows among `row_ids` that exist (absent ids were deleted)."""
    cur = await conn.execute(
        sql.SQL("SELECT {} FROM {} WHERE {} = ANY(%s::{}[])").format(
            _values(source),
            source.relation,
            sql.Identifier(source.id_column),
            sql.SQL(source.id_type),  # format_type() output, read from the catalog
        ),
        (list(row_ids),),
    )
    return {
        row_id: SourceRow(row_id, text, metadata or {}, bool(included))
        for row_id, text, metadata, included in await cur.fetchall()
    }


async def done(conn: AsyncConnection[Any], seqs: Sequence[int]) -> None:
    """Deletes the entries a batch has stored (its own, locked since its claim)."""
    await conn.execute("DELETE FROM embedpool_sync.changes WHERE seq = ANY(%s)", (list(seqs),))


async def failed(conn: AsyncConnection[Any], claimed: Claimed, failures: dict[str, str], max_attempts: int) -> int:
    """Records one more failed attempt of each row in `failures` (row id -> error) on the entries this batch
    holds: retried after an exponential backoff (1 s, 2 s, 4 s, ... at most 5 min), dead-lettered with its
    error after `max_attempts`. Returns how many rows were dead-lettered. A later change of a dead row queues
    a fresh entry, so fixing the row retries it."""
    dead = 0
    for row_id, error in failures.items():
        tries = claimed.attempts.get(row_id, 0) + 1
        gone = tries >= max_attempts
        dead += gone
        await conn.execute(
            "UPDATE embedpool_sync.changes SET attempts = %s, dead = %s, error = %s, failed_at = now(),"
            " not_before = now() + least(interval '1 second' * 2 ^ (%s - 1), interval '5 minutes')"
            " WHERE seq = ANY(%s)",
            (tries, gone, error[:2000], tries, claimed.seqs.get(row_id, [])),
        )
    return dead


async def queue_stats(conn: AsyncConnection[Any], sync: str) -> QueueStats:
    cur = await conn.execute(
        "SELECT count(DISTINCT row_id) FILTER (WHERE NOT dead), count(*) FILTER (WHERE NOT dead),"
        " coalesce(extract(epoch FROM now() - min(enqueued_at) FILTER (WHERE NOT dead)), 0),"
        " count(DISTINCT row_id) FILTER (WHERE dead)"
        " FROM embedpool_sync.changes WHERE sync = %s",
        (sync,),
    )
    row = await cur.fetchone()
    assert row is not None
    cur = await conn.execute(
        "SELECT row_id, error FROM embedpool_sync.changes WHERE sync = %s AND error IS NOT NULL"
        " ORDER BY failed_at DESC LIMIT 1",
        (sync,),
    )
    last = await cur.fetchone()
    return QueueStats(
        int(row[0]), int(row[1]), float(row[2]), int(row[3]), last[1] if last else "", last[0] if last else ""
    )


async def has_queue(conn: AsyncConnection[Any]) -> bool:
    return await _exists(conn, "embedpool_sync.changes")
