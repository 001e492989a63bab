"""Syncs: keep a collection equal to a table of the user's database (create, list, status, pause, resume, drop).

The definition lives in embedpool's database (store.syncs); the queue and the trigger in the source database
(store.sync_source), where service.sync_worker drains them. Only an admin key granted every collection may
manage syncs (Action.MANAGE_SYNCS): a sync reads whatever the server's database role can read.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Final

import psycopg
from psycopg import errors as pg

from embedpool.errors import AlreadyExists, InvalidArgument, NotFound
from embedpool.service import limits as check
from embedpool.service.core import EmbeddingService
from embedpool.store import Store
from embedpool.store import sync_source as source_db
from embedpool.store import syncs as defs
from embedpool.store.sources import DEFAULT, SourceDatabases
from embedpool.store.sync_source import QueueStats, SyncSource
from embedpool.store.syncs import SyncRecord

__all__ = ["SyncSpec", "SyncStatus", "Syncs"]

_log = logging.getLogger("embedpool.sync")
_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,47}")
_IDENT_BYTES: Final = 63  # Postgres truncates longer identifiers
_EXPR_BYTES: Final = 4096


@dataclass(frozen=True, slots=True)
class SyncSpec:
    name: str
    source: str
    """`schema.table`, or `table` in schema public."""
    id_column: str
    text: str
    """A SQL expression over the table's columns, e.g. `title || ' ' || body`."""
    collection: str
    metadata_columns: tuple[str, ...] = ()
    where: str = ""
    database: str = DEFAULT


@dataclass(frozen=True, slots=True)
class SyncStatus:
    record: SyncRecord
    queue: QueueStats
    rows_per_s: float
    """Rows stored or removed per second over the last minute, by every replica."""
    failures_last_minute: int
    backfilled: int = 0
    """Rows queued by create (only on create's answer)."""


def _identifier(value: str, field: str) -> str:
    if not value or len(value.encode()) > _IDENT_BYTES or "\x00" in value:
        raise InvalidArgument(f"{field}: {value[:80]!r} is not a column or table name (1-63 bytes)")
    return value


def _expression(value: str, field: str) -> str:
    if len(value.encode()) > _EXPR_BYTES or "\x00" in value or ";" in value:
        raise InvalidArgument(f"{field}: must be one SQL expression of at most {_EXPR_BYTES} bytes")
    return value


def _bad_source(e: psycopg.Error, field: str) -> InvalidArgument:
    """The database's own words about the caller's expression or names (class 42: a column or function that
    does not exist, a syntax or type error); they name only what the caller wrote."""
    primary = e.diag.message_primary or "the database refused it"
    return InvalidArgument(f"{field}: {primary}")


class Syncs:
    def __init__(self, core: EmbeddingService, store: Store, sources: SourceDatabases) -> None:
        self._core = core
        self._store = store
        self._sources = sources

    async def create(self, spec: SyncSpec) -> SyncStatus:
        """Checks the source, creates the collection if it does not exist, records the sync, and installs the
        trigger and the backfill in the source database in one transaction."""
        if not _NAME.fullmatch(spec.name):
            raise InvalidArgument(f"name: {spec.name[:80]!r} is not a sync name (a-z, then a-z 0-9 _; 1-48)")
        check.collection_name(spec.collection)
        schema, _, table = spec.source.rpartition(".")
        source = SyncSource(
            spec.name,
            _identifier(schema or "public", "source"),
            _identifier(table, "source"),
            _identifier(spec.id_column, "id_column"),
            "",
            _expression(spec.text, "text"),
            tuple(_identifier(c, "metadata_columns") for c in spec.metadata_columns),
            _expression(spec.where, "where"),
        )
        if not source.text_expr.strip():
            raise InvalidArgument("text: must not be empty")
        async with self._sources.connection(spec.database) as conn:
            id_type = await source_db.describe_id(conn, source.schema, source.table, source.id_column)
            if id_type is None:
                raise InvalidArgument(
                    f"source: {spec.database} has no table {source.schema}.{source.table} with column"
                    f" {source.id_column!r}"
                )
            source = SyncSource(
                source.name,
                source.schema,
                source.table,
                source.id_column,
                id_type,
                source.text_expr,
                source.metadata_columns,
                source.where_expr,
            )
            try:
                await source_db.check(conn, source)
            except pg.ProgrammingError as e:  # class 42 (and its subclasses): the caller's names or expression
                raise _bad_source(e, "text/where/metadata_columns") from None
            except pg.DataError as e:
                raise _bad_source(e, "text/where") from None
        record = SyncRecord(source, spec.database, spec.collection, paused=False)
        async with self._store.connection() as conn:
            existing = await defs.get(conn, spec.name)
        if existing is not None:
            if (existing.source, existing.database, existing.collection) == (source, spec.database, spec.collection):
                return await self.status(spec.name)  # a retried create: the same sync, already there
            raise AlreadyExists(f"name: sync {spec.name!r} exists with another definition")
        with contextlib.suppress(AlreadyExists):  # an existing collection is used as it is, whatever its options
            await self._core.create_collection(spec.collection)
        # The definition commits inside the source transaction, so a name taken by a concurrent create rolls the
        # trigger and backfill back, and workers never see a definition whose queue is not yet committed.
        async with self._sources.connection(spec.database) as source_conn, source_conn.transaction():
            backfilled = await source_db.install(source_conn, source)
            async with self._store.connection() as conn:
                if not await defs.create(conn, record):
                    raise AlreadyExists(f"name: sync {spec.name!r} exists")
        _log.info("sync %s created: %s rows of %s.%s queued", spec.name, backfilled, source.schema, source.table)
        status = await self.status(spec.name)
        return SyncStatus(status.record, status.queue, status.rows_per_s, status.failures_last_minute, backfilled)

    async def list(self) -> list[SyncStatus]:
        async with self._store.connection() as conn:
            records = await defs.list_all(conn)
        return [await self._status(record) for record in records]

    async def status(self, name: str) -> SyncStatus:
        return await self._status(await self._record(name))

    async def pause(self, name: str, paused: bool = True) -> SyncStatus:
        """Workers stop taking its batches (a batch under way finishes); changes go on queueing."""
        async with self._store.connection() as conn:
            if not await defs.set_paused(conn, name, paused):
                raise NotFound(f"name: no sync {name!r}")
        return await self.status(name)

    async def drop(self, name: str) -> None:
        """Removes the trigger and the queue in the source database, then the definition. The collection and
        what it holds stay: drop it on its own if it is no longer wanted."""
        record = await self._record(name)
        async with self._sources.connection(record.database) as conn, conn.transaction():
            await source_db.uninstall(conn, record.source)
        async with self._store.connection() as conn:
            await defs.delete(conn, name)

    async def _record(self, name: str) -> SyncRecord:
        async with self._store.connection() as conn:
            record = await defs.get(conn, name)
        if record is None:
            raise NotFound(f"name: no sync {name!r}")
        return record

    async def _status(self, record: SyncRecord) -> SyncStatus:
        async with self._sources.connection(record.database) as conn:
            queue = await source_db.queue_stats(conn, record.name)
        async with self._store.connection() as conn:
            rows_per_s, failures = await defs.rate(conn, record.name)
        return SyncStatus(record, queue, rows_per_s, failures)
