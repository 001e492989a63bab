"""The sync workers of one server: drain every active sync's queue into its collection (see store.sync_source
for why a batch is exactly-once in effect, and ordered per row).

--sync-workers batches run at once, each over the active syncs in turn. A worker that found nothing waits for
a notification (a source table changed, a sync was created or resumed) or --sync-poll-seconds, whichever
comes first, so a lost notification only delays work. A failing batch is rolled back and retried later; a
failing row is retried with backoff and dead-lettered after --sync-max-attempts, without holding up the rows
around it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio
import psycopg
from anyio.abc import TaskStatus
from psycopg import AsyncConnection

from embedpool import metrics, tracing
from embedpool.errors import EmbedpoolError, InferenceFailed, InvalidArgument, NotFound, Unavailable
from embedpool.pool.priority import Priority
from embedpool.service.core import EmbeddingService
from embedpool.service.documents import Document
from embedpool.store import Store
from embedpool.store import sync_source as source_db
from embedpool.store import syncs as defs
from embedpool.store.sources import APPLICATION_NAME, DEFAULT, SourceDatabases
from embedpool.store.syncs import SyncRecord

__all__ = ["SyncWorkerConfig", "SyncWorkers"]

_log = logging.getLogger("embedpool.sync")
_BACKOFF_S: Final = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_LIST_EVERY_S: Final = 1.0
_BATCH_DEADLINE_S: Final = 120.0
_REQUEUE_PAGE: Final = 10_000
_ROW_ERRORS: Final = (InvalidArgument, InferenceFailed)
"""Errors that belong to a row (its text, its metadata, the engine failing on it): retried and dead-lettered
per row. Any other error fails the batch, which is rolled back and retried whole."""


@dataclass(frozen=True, slots=True)
class SyncWorkerConfig:
    workers: int = 2
    batch_size: int = 256
    max_attempts: int = 5
    poll_seconds: float = 5.0


class SyncWorkers:
    def __init__(
        self, core: EmbeddingService, store: Store, sources: SourceDatabases, config: SyncWorkerConfig
    ) -> None:
        self._core = core
        self._store = store
        self._sources = sources
        self._config = config
        self._wake = anyio.Event()
        self._active: list[SyncRecord] = []
        self._listed_at = -math.inf
        self._labels: set[str] = set()
        self._upgraded: set[str] = set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled. With 0 workers this server works no syncs (others sharing the database do)."""
        async with anyio.create_task_group() as tg:
            if self._config.workers > 0:
                for name in self._sources.names:
                    tg.start_soon(self._listen, name)
                tg.start_soon(self._watch)
                for k in range(self._config.workers):
                    tg.start_soon(self._work, k)
            task_status.started()

    def wake(self) -> None:
        """Every waiting worker looks for work now."""
        self._wake.set()
        self._wake = anyio.Event()

    async def _work(self, k: int) -> None:
        failures = 0
        while True:
            wake = self._wake  # taken before looking, so a notification while looking is not missed
            try:
                worked = False
                for record in _rotated(await self._syncs(), k):
                    worked |= await self.batch(record) > 0
                failures = 0
            except EmbedpoolError as e:  # the database or the engine is unavailable: back off, then retry
                delay = _BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)]
                failures += 1
                _log.warning("sync worker %d: %s; retrying in %.1f s", k, e, delay)
                await anyio.sleep(delay)
                continue
            if not worked:
                with anyio.move_on_after(self._config.poll_seconds):
                    await wake.wait()

    async def _syncs(self) -> list[SyncRecord]:
        """The active syncs, listed again at most every second (a notification of a change wakes the workers,
        which then see it within that second)."""
        now = anyio.current_time()
        if now - self._listed_at >= _LIST_EVERY_S:
            async with self._store.connection() as conn:
                records = await defs.list_all(conn)
            self._active = [r for r in records if not r.paused]
            self._listed_at = now
            self._forget_dropped({r.name for r in records})
        return self._active

    async def batch(self, record: SyncRecord) -> int:
        """Works one batch of `record`'s queue; returns the rows it settled (stored, removed or failed)."""
        name = record.name
        try:
            if name not in self._upgraded:
                async with self._sources.connection(record.database, work=True) as conn, conn.transaction():
                    if await source_db.upgrade(conn, record.source):
                        _log.info("sync %s: its source table's TRUNCATE is now captured", name)
                self._upgraded.add(name)
            async with self._sources.connection(record.database, work=True) as conn, conn.transaction():
                if await source_db.take_truncation(conn, name):
                    return await self._requeue(conn, record)
                claimed = await source_db.claim(conn, name, self._config.batch_size)
                if claimed is None:
                    return 0
                with tracing.span("sync batch", sync=name, rows=len(claimed.row_ids)):
                    settled, failures, dead = await self._settle(conn, record, claimed)
        except NotFound as e:  # its collection or source table was dropped: its rows wait until it is back
            _log.info("sync %s: %s", name, e)
            return 0
        except psycopg.Error as e:
            raise _unavailable(name, e) from e
        metrics.SYNC_ROWS.labels(name).inc(settled - len(failures))
        if failures:
            metrics.SYNC_FAILURES.labels(name).inc(len(failures))
        if dead:
            metrics.SYNC_DEAD_LETTERED.labels(name).inc(dead)
        try:
            async with self._store.connection() as conn:
                await defs.record_progress(conn, name, settled - len(failures), len(failures))
        except EmbedpoolError as e:  # progress is for `sync status` only: never fail the batch for it
            _log.info("sync %s: progress not recorded: %s", name, e)
        return settled

    async def _requeue(self, conn: AsyncConnection[Any], record: SyncRecord) -> int:
        """After a TRUNCATE of the source table: a change of every id the collection holds, in the transaction
        that clears the mark. Each is then stored again (unchanged rows are not embedded) or removed, as the
        table has it by then; a row written since the TRUNCATE has queued its own change too."""
        queued, after = 0, None
        while ids := await self._store.document_ids(record.collection, after=after, limit=_REQUEUE_PAGE):
            await source_db.queue_ids(conn, record.name, ids)
            queued, after = queued + len(ids), ids[-1]
        _log.info("sync %s: its source table was truncated; %d stored ids queued to be checked", record.name, queued)
        return max(queued, 1)  # worked: the loop comes back for the queue at once

    async def _settle(
        self, conn: AsyncConnection[Any], record: SyncRecord, claimed: source_db.Claimed
    ) -> tuple[int, dict[str, str], int]:
        rows = await source_db.read_rows(conn, record.source, claimed.row_ids)
        documents: list[Document] = []
        failures: dict[str, str] = {}
        removed: list[str] = []
        for row_id in claimed.row_ids:
            row = rows.get(row_id)
            if row is None or not row.included:
                removed.append(row_id)
            elif row.text is None:
                failures[row_id] = "the text expression is NULL for this row"
            else:
                documents.append(Document(row.text, row_id, row.metadata))
        deadline = anyio.current_time() + _BATCH_DEADLINE_S
        failures.update(await self._write(record.collection, documents, deadline))
        if removed:
            await self._core.delete(record.collection, ids=removed)
        stored = [row_id for row_id in claimed.row_ids if row_id not in failures]
        await source_db.done(conn, [seq for row_id in stored for seq in claimed.seqs.get(row_id, [])])
        dead = await source_db.failed(conn, claimed, failures, self._config.max_attempts) if failures else 0
        return len(claimed.row_ids), failures, dead

    async def _write(self, collection: str, documents: Sequence[Document], deadline: float) -> dict[str, str]:
        """Stores `documents`; returns the ids that failed on their own, with why. A batch with a row error is
        halved until each error is pinned to its row, so one poison row costs its neighbours a few retries."""
        if not documents:
            return {}
        try:
            # Bulk: interactive calls go ahead of a backfill; waiting for room instead of failing, as Ingest does.
            outcome = await self._core.write(
                collection, documents, deadline=deadline, priority=Priority.BULK, wait=True
            )
        except _ROW_ERRORS as e:
            if len(documents) == 1:
                return {documents[0].id: str(e)}
            half = len(documents) // 2
            return {
                **await self._write(collection, documents[:half], deadline),
                **await self._write(collection, documents[half:], deadline),
            }
        return {r.id: r.reason for r in outcome.rejected}

    async def _listen(self, database: str) -> None:
        """Wakes the workers on every notification from `database`: a source row changed (channel
        embedpool_sync), or, in embedpool's own database, a sync was created, paused or resumed."""
        channels = [source_db.CHANNEL] + (["embedpool_syncs"] if database == DEFAULT else [])
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._sources.url(database), autocommit=True, connect_timeout=10, application_name=APPLICATION_NAME
                ) as conn:
                    for channel in channels:
                        await conn.execute(f"LISTEN {channel}")
                    failures = 0
                    self.wake()  # changes made while not listening
                    async for _ in conn.notifies():
                        if database == DEFAULT:
                            self._listed_at = -math.inf
                        self.wake()
            except psycopg.Error as e:
                delay = _BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)]
                failures += 1
                _log.info("sync: not listening on %s (%s); retrying in %.1f s", database, type(e).__name__, delay)
                await anyio.sleep(delay)

    async def _watch(self) -> None:
        """Backlog, lag and dead letters of every active sync, as gauges (every replica reports the same
        queue: Prometheus merges them with max)."""
        while True:
            await anyio.sleep(self._config.poll_seconds)
            try:
                for record in await self._syncs():
                    async with self._sources.connection(record.database) as conn:
                        stats = await source_db.queue_stats(conn, record.name)
                    metrics.SYNC_BACKLOG.labels(record.name).set(stats.pending_rows)
                    metrics.SYNC_LAG.labels(record.name).set(stats.oldest_pending_s)
                    metrics.SYNC_DEAD_ROWS.labels(record.name).set(stats.dead_rows)
                    self._labels.add(record.name)
            except (EmbedpoolError, psycopg.Error) as e:
                _log.info("sync: queue statistics not read: %s", e)

    def _forget_dropped(self, names: set[str]) -> None:
        for name in self._labels - names:
            for gauge in (metrics.SYNC_BACKLOG, metrics.SYNC_LAG, metrics.SYNC_DEAD_ROWS):
                with contextlib.suppress(KeyError):
                    gauge.remove(name)
        self._labels &= names


def _rotated(records: list[SyncRecord], k: int) -> list[SyncRecord]:
    """Worker k starts at sync k: with several syncs, each gets workers even when the first is never idle."""
    if not records:
        return []
    k %= len(records)
    return records[k:] + records[:k]


def _unavailable(name: str, e: psycopg.Error) -> EmbedpoolError:
    _log.warning("sync %s: source database error: %s", name, e)
    return Unavailable(f"sync {name}: source database unavailable")
