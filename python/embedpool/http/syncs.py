"""Syncs over HTTP: create, list, get, pause, resume, drop (an admin key granted every collection). Each route
passes the gate, calls the core's Syncs and shapes the answer; the collection is named as the caller knows it."""

from __future__ import annotations

from fastapi import APIRouter, Request

from embedpool.http.errors import CONFLICT, ERRORS
from embedpool.http.guard import Gatekeeper
from embedpool.http.schemas import CreateSync, Sync, SyncDeleted, SyncList
from embedpool.security.principal import Action
from embedpool.service.gate import Call
from embedpool.service.syncs import Syncs, SyncSpec, SyncStatus
from embedpool.store.sources import DEFAULT


def _sync(status: SyncStatus, collection: str, created: bool = False) -> Sync:
    record, source, queue = status.record, status.record.source, status.queue
    return Sync(
        name=record.name,
        source=f"{source.schema}.{source.table}",
        id_column=source.id_column,
        text=source.text_expr,
        collection=collection,
        metadata_columns=list(source.metadata_columns),
        where=source.where_expr,
        database=record.database,
        paused=record.paused,
        backlog_rows=queue.pending_rows,
        pending_changes=queue.pending_changes,
        lag_seconds=queue.oldest_pending_s,
        rows_per_second=status.rows_per_s,
        failures_last_minute=status.failures_last_minute,
        dead_rows=queue.dead_rows,
        last_error=queue.last_error,
        last_error_row=queue.last_error_row,
        backfilled_rows=status.backfilled if created else None,
    )


def router(syncs: Syncs, keeper: Gatekeeper) -> APIRouter:
    api = APIRouter(prefix="/v1/syncs", tags=["Syncs"])
    gate = keeper.gate

    def shown(call: Call, status: SyncStatus, created: bool = False) -> Sync:
        return _sync(status, gate.caller_name(call, status.record.collection), created)

    @api.post("", response_model=Sync, responses={**ERRORS, **CONFLICT})
    async def create_sync(body: CreateSync, request: Request, call: Call = keeper.opens("CreateSync")) -> Sync:
        """Installs the table's trigger, queues its rows (the backfill) and creates the collection if needed;
        every server sharing the database then embeds queued rows. The same definition again answers the sync as
        it is (a retried create); another one under a taken name is 409."""
        call.audited = True
        stored = gate.authorize(call, Action.MANAGE_SYNCS, body.collection, "collection")
        spec = SyncSpec(
            name=body.name,
            source=body.source,
            id_column=body.id_column,
            text=body.text,
            collection=stored,
            metadata_columns=tuple(body.metadata_columns),
            where=body.where,
            database=body.database or DEFAULT,
        )
        return shown(call, await syncs.create(spec), created=True)

    @api.get("", response_model=SyncList, responses=ERRORS)
    async def list_syncs(request: Request, call: Call = keeper.opens("ListSyncs")) -> SyncList:
        gate.authorize(call, Action.MANAGE_SYNCS)
        return SyncList(data=[shown(call, s) for s in await syncs.list()])

    @api.get("/{name}", response_model=Sync, responses=ERRORS)
    async def get_sync(name: str, request: Request, call: Call = keeper.opens("GetSync")) -> Sync:
        """A sync with its queue: backlog, lag, rows/s, dead letters and the last error."""
        gate.authorize(call, Action.MANAGE_SYNCS)
        return shown(call, await syncs.status(name))

    @api.post("/{name}/pause", response_model=Sync, responses=ERRORS)
    async def pause_sync(name: str, request: Request, call: Call = keeper.opens("PauseSync")) -> Sync:
        """Workers stop taking its batches; changes go on queueing."""
        call.audited = True
        gate.authorize(call, Action.MANAGE_SYNCS)
        return shown(call, await syncs.pause(name))

    @api.post("/{name}/resume", response_model=Sync, responses=ERRORS)
    async def resume_sync(name: str, request: Request, call: Call = keeper.opens("ResumeSync")) -> Sync:
        call.audited = True
        gate.authorize(call, Action.MANAGE_SYNCS)
        return shown(call, await syncs.pause(name, paused=False))

    @api.delete("/{name}", response_model=SyncDeleted, responses=ERRORS)
    async def drop_sync(name: str, request: Request, call: Call = keeper.opens("DropSync")) -> SyncDeleted:
        """Removes the trigger and the queue from the source database; the collection and its documents stay."""
        call.audited = True
        gate.authorize(call, Action.MANAGE_SYNCS)
        await syncs.drop(name)
        return SyncDeleted(name=name, deleted=True)

    return api
