"""The Ingest stream over a sync grpc channel: gRPC's own thread pulls the requests, the caller's thread reads
the acknowledgements, and a condition variable holds the request side back while `window` batches are in
flight."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import grpc

from embedpool.client.ingest import IngestLedger, Reopening
from embedpool.client.propagation import with_trace_context
from embedpool.client.retry import Attempts, Deadline, Failure
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

__all__ = ["run_ingest"]


def run_ingest(ledger: IngestLedger, stubs: Sequence[pb_grpc.EmbedderStub], attempts: Attempts, *, bulk: bool) -> None:
    """Streams every batch of `ledger` until each is acknowledged, opening a new stream (on the next target)
    after a retryable failure."""
    flow, reopening = _Flow(ledger, bulk), Reopening(ledger, attempts)
    while not ledger.done():
        failure = flow.stream(with_trace_context(stubs[reopening.target()]), attempts.deadline)
        time.sleep(reopening.ended(failure))


class _Flow:
    """The streams of one ingest, one after another. `state` guards the ledger; `reading` lets one request
    iterator at a time read the source, outside `state`, and is held by a new stream while it lists what to
    send again, so that a batch an earlier stream's iterator is still reading is not missed."""

    def __init__(self, ledger: IngestLedger, bulk: bool) -> None:
        self.ledger = ledger
        self.bulk = bulk
        self.state = threading.Condition()
        self.reading = threading.Lock()
        self.generation = 0  # the current stream; the request iterator of an earlier one stops
        self.error: Exception | None = None  # raised by the source, on gRPC's thread

    def stream(self, stub: pb_grpc.EmbedderStub, deadline: Deadline) -> Failure | None:
        """One stream until it ends; the failure when it failed with a status."""
        with self.state:
            self.generation += 1
            generation = self.generation
        acks = stub.Ingest(self._requests(generation), timeout=deadline.remaining())
        try:
            for ack in acks:
                with self.state:
                    self.ledger.acknowledge(ack)
                    self.state.notify_all()
        except grpc.RpcError as e:
            if self.error is None:
                assert isinstance(e, grpc.Call)
                return Failure.of(e.code(), e.details(), e.trailing_metadata())
        except BaseException:
            acks.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves RpcContext.cancel untyped
            raise
        finally:
            with self.state:
                self.generation += 1
                self.state.notify_all()
        if self.error is not None:
            raise self.error
        if not self.ledger.done():
            return Failure(grpc.StatusCode.UNAVAILABLE, "the stream ended before every batch was acknowledged")
        return None

    def _requests(self, generation: int) -> Iterator[pb.IngestRequest]:
        """Runs on gRPC's thread: it waits here, not the caller's thread, while the window is full. What the
        source raises ends the stream after what was sent; `stream` raises it then."""
        try:
            with self.reading, self.state:
                resent = self.ledger.in_flight()
            first = True
            for again in resent:
                again.bulk, first = self.bulk and first, False
                yield again
            while (request := self._next(generation)) is not None:
                request.bulk, first = self.bulk and first, False
                yield request
        except Exception as e:
            self.error = e

    def _next(self, generation: int) -> pb.IngestRequest | None:
        with self.state:
            self.state.wait_for(lambda: self.generation != generation or self.ledger.room())
        with self.reading:
            with self.state:
                if self.generation != generation:
                    return None
            read = self.ledger.read()
            with self.state:
                # Registered even when this stream has ended meanwhile: the next one sends it again.
                request = self.ledger.register(read)
                return request if self.generation == generation else None
