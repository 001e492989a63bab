"""The ingest pipeline of a stream of batches: embedded ahead, stored concurrently, acknowledged in order.

    reader ──(window embedding)──> storer ──(stores storing)──> acker ──> client

- Embedding: each batch starts embedding as soon as it is read; at most `window` (--ingest-window) are read
  ahead, so a fast client is held back by its transport's flow control, not server memory.
- Storing: up to `stores` (--ingest-stores) batches are written at once, each in its own transaction on its own pooled
  connection (one COPY stream keeps one Postgres backend busy; bench/ingest.py `writer_fresh_2_streams`).
  A batch that shares an id with an earlier batch still in flight waits for it, so the later row of an id
  is the one stored, as sent.
- Acknowledging: strictly in stream order, each after its batch committed. A batch may commit before an
  earlier one fails; it is then not acknowledged, and the client's resend of it changes nothing (unchanged
  rows are skipped), so the store ends as if every batch ran exactly once.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from embedpool.service.documents import WriteOutcome
from embedpool.service.writes import EmbeddedBatch

__all__ = ["run_ingest"]


T = TypeVar("T")
R = TypeVar("R")  # a batch as the door received it: read, checked, embedded, acknowledged
C = TypeVar("C")  # what checking a batch found, for embedding it


class _Future(Generic[T]):
    """A result set once by one task and awaited by another; an exception is re-raised where awaited."""

    def __init__(self) -> None:
        self._done = anyio.Event()
        self._value: T | None = None
        self._error: Exception | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def settle(self, work: Callable[[], Awaitable[T]]) -> None:
        try:
            self._value = await work()
        except Exception as exc:  # re-raised in stream order by result(), where the rpc wrapper maps it
            self._error = exc
        finally:
            self._done.set()

    async def wait(self) -> None:
        await self._done.wait()

    async def result(self) -> T:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


class _Storing:
    """One batch on its way into the store."""

    def __init__(self, batch: EmbeddedBatch) -> None:
        self.ids = frozenset(batch.ids)
        self.outcome = _Future[WriteOutcome]()

    async def run(
        self, store: Store, batch: EmbeddedBatch, earlier: Sequence[_Storing], slots: anyio.Semaphore
    ) -> None:
        async def stored() -> WriteOutcome:
            for other in earlier:
                if not self.ids.isdisjoint(other.ids):
                    await other.outcome.wait()  # its rows for our ids must land first
            async with slots:
                return await store(batch)

        await self.outcome.settle(stored)


Store = Callable[[EmbeddedBatch], Awaitable[WriteOutcome]]


async def run_ingest(
    requests: AsyncIterator[R],
    check: Callable[[R], Awaitable[C]],
    embed: Callable[[R, C], Awaitable[EmbeddedBatch]],
    store: Store,
    ack: Callable[[R, WriteOutcome], Awaitable[None]],
    *,
    window: int,
    stores: int,
    stop: anyio.Event | None = None,
) -> bool:
    """Drive one Ingest stream: `check` validates each request as it is read (raising ends the stream; what it
    returns is passed on to `embed`),
    `embed` embeds one, `store` writes one embedded batch, `ack` sends one acknowledgement. The first error,
    in stream order, ends the stream (raised in an ExceptionGroup). Once `stop` is set (the server drains),
    no further request is read; the ones read are finished and acknowledged, and True is returned: the client
    resends the rest elsewhere, from the batch after the last acknowledged one."""
    stop = stop or anyio.Event()
    embedded_send, embedded_receive = anyio.create_memory_object_stream[tuple[R, _Future[EmbeddedBatch]]](window)
    stored_send, stored_receive = anyio.create_memory_object_stream[tuple[R, _Storing]](stores)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_read, requests, check, embed, embedded_send, tg, stop)
        tg.start_soon(_acknowledge, stored_receive, ack)
        await _store(embedded_receive, store, stores, stored_send, tg)
    return stop.is_set()


async def _read(
    requests: AsyncIterator[R],
    check: Callable[[R], Awaitable[C]],
    embed: Callable[[R, C], Awaitable[EmbeddedBatch]],
    send: MemoryObjectSendStream[tuple[R, _Future[EmbeddedBatch]]],
    tg: TaskGroup,
    stop: anyio.Event,
) -> None:
    async with send, anyio.create_task_group() as reading:

        async def stop_reading() -> None:
            await stop.wait()
            reading.cancel_scope.cancel()

        reading.start_soon(stop_reading)
        async for request in requests:
            checked = await check(request)
            embedded = _Future[EmbeddedBatch]()
            tg.start_soon(embedded.settle, functools.partial(embed, request, checked))
            if not await _forward(send, (request, embedded)):
                break
        reading.cancel_scope.cancel()


async def _store(
    receive: MemoryObjectReceiveStream[tuple[R, _Future[EmbeddedBatch]]],
    store: Store,
    stores: int,
    send: MemoryObjectSendStream[tuple[R, _Storing]],
    tg: TaskGroup,
) -> None:
    slots = anyio.Semaphore(stores)
    in_flight: list[_Storing] = []
    async with receive, send:
        async for request, embedded in receive:
            batch = await embedded.result()
            storing = _Storing(batch)
            tg.start_soon(storing.run, store, batch, list(in_flight), slots)
            in_flight = [s for s in in_flight if not s.outcome.done] + [storing]
            if not await _forward(send, (request, storing)):
                return


async def _forward(send: MemoryObjectSendStream[T], item: T) -> bool:
    """Send `item` on; False when the next stage has ended (it failed or was cancelled, and its error or the
    cancellation is the one the stream ends with, not this stage's broken pipe)."""
    try:
        await send.send(item)
    except anyio.BrokenResourceError:
        return False
    return True


async def _acknowledge(
    receive: MemoryObjectReceiveStream[tuple[R, _Storing]], ack: Callable[[R, WriteOutcome], Awaitable[None]]
) -> None:
    async with receive:
        async for request, storing in receive:
            await ack(request, await storing.outcome.result())
