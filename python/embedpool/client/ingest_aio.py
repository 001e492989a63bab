"""The Ingest stream over a grpc.aio channel: a writer task sends batches while the window has room, the
caller's task reads the acknowledgements. The source is read in a worker thread, so a slow one holds up neither
the acknowledgements nor the event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from embedpool.client.ingest import IngestLedger, Reopening
from embedpool.client.propagation import with_trace_context
from embedpool.client.retry import Attempts, Deadline, Failure
from embedpool.v1 import embedpool_pb2 as pb

if TYPE_CHECKING:
    from embedpool.v1.embedpool_pb2_grpc import EmbedderAsyncStub

__all__ = ["run_ingest"]

Call = grpc.aio.StreamStreamCall[pb.IngestRequest, pb.IngestAck]


async def run_ingest(
    ledger: IngestLedger, stubs: Sequence[EmbedderAsyncStub], attempts: Attempts, *, bulk: bool
) -> None:
    """As embedpool.client.ingest_sync.run_ingest, on asyncio."""
    reopening = Reopening(ledger, attempts)
    while not ledger.done():
        failure = await _Stream(ledger, bulk).run(with_trace_context(stubs[reopening.target()]), attempts.deadline)
        await asyncio.sleep(reopening.ended(failure))


class _Stream:
    def __init__(self, ledger: IngestLedger, bulk: bool) -> None:
        self.ledger = ledger
        self.bulk = bulk
        self.room = asyncio.Condition()
        self.over = False

    async def run(self, stub: EmbedderAsyncStub, deadline: Deadline) -> Failure | None:
        """One stream until it ends; the failure when it failed with a status."""
        call: Call = stub.Ingest(None, timeout=deadline.remaining())  # None: requests go by call.write
        writer = asyncio.create_task(self._write(call))
        try:
            async for ack in call:
                self.ledger.acknowledge(ack)
                async with self.room:
                    self.room.notify_all()
        except grpc.aio.AioRpcError as e:
            failure: Failure | None = Failure.of(e.code(), e.details(), e.trailing_metadata())
        except BaseException:
            call.cancel()
            writer.cancel()  # the ingest is abandoned: a batch being read may be lost with it
            raise
        else:
            failure = None
        # Not cancelled: a batch being read is registered, and the next stream sends it again.
        async with self.room:
            self.over = True
            self.room.notify_all()
        await writer  # raises what the source raised
        if failure is None and not self.ledger.done():
            return Failure(grpc.StatusCode.UNAVAILABLE, "the stream ended before every batch was acknowledged")
        return failure

    async def _write(self, call: Call) -> None:
        """Sends the batches a failed stream left in flight, then new ones while the window has room, then
        closes the request side. What the source raises ends the stream after what was sent."""
        first = True
        try:
            for again in self.ledger.in_flight():
                again.bulk, first = self.bulk and first, False
                await call.write(again)
            while True:
                async with self.room:
                    await self.room.wait_for(lambda: self.over or self.ledger.room())
                if self.over:
                    return
                request = self.ledger.register(await asyncio.to_thread(self.ledger.read))
                if request is None or self.over:
                    return
                request.bulk, first = self.bulk and first, False
                await call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the call is over: the reader has its status
        finally:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.done_writing()
