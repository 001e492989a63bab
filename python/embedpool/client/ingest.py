"""Bulk ingest over the bidirectional `Ingest` RPC: the bookkeeping the sync and the async stream share.

Documents go out in numbered batches, at most `window` ahead of the acknowledgements (flow control: the server's
backlog and ours stay bounded). The server acknowledges each batch once it is committed; the checkpoint moves
over the acknowledged prefix and, with a checkpoint file, is saved after each move, so a later run resumes at the
first unacknowledged document. When a stream fails with a retryable status the batches in flight are sent again
on a new stream (to another target when there is one); re-sending is harmless, since the server's content-hash
check finds them stored (they come back unchanged, not embedded again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

from embedpool.client import checkpoint as checkpoints
from embedpool.client import wire
from embedpool.client.checkpoint import Checkpoint
from embedpool.client.retry import Attempts, Failure
from embedpool.client.split import field_size, runs
from embedpool.client.types import Document, Limits, Rejected
from embedpool.errors import InferenceFailed, InvalidArgument
from embedpool.v1 import embedpool_pb2 as pb

__all__ = [
    "BatchAck",
    "IngestLedger",
    "IngestProgress",
    "IngestSummary",
    "IterableSource",
    "Positioned",
    "Read",
    "Reopening",
    "Source",
]


class Positioned(NamedTuple):
    document: Document | str
    end: int
    """The source position just after this document."""


@runtime_checkable
class Source(Protocol):
    """Documents that can be read again from a position: what lets an ingest resume where it stopped."""

    @property
    def key(self) -> str:
        """Names the source in a checkpoint, so that a checkpoint of another source is not resumed."""
        ...

    def read(self, start: int) -> Iterator[Positioned]: ...

    def remaining(self, start: int) -> int | None:
        """Documents from `start` on, when the source can tell cheaply (for progress)."""
        ...


class IterableSource:
    """Any iterable of documents; its positions count items, so resuming skips the acknowledged ones (the
    iterable must yield the same documents in the same order again)."""

    key = ""

    def __init__(self, documents: Iterable[Document | str]) -> None:
        self.documents = documents

    def read(self, start: int) -> Iterator[Positioned]:
        items = itertools.islice(self.documents, start, None)
        return (Positioned(doc, n) for n, doc in enumerate(items, start=start + 1))

    def remaining(self, start: int) -> int | None:
        return max(0, len(self.documents) - start) if isinstance(self.documents, Sized) else None


@dataclass(frozen=True, slots=True)
class BatchAck:
    batch_id: int
    documents: int
    ids: list[str]
    inserted: int
    updated: int
    unchanged: int
    skipped_unchanged: int
    """Not embedded again: their text was stored with the same model."""
    rejected: list[Rejected]
    """Indexes are within the batch."""


@dataclass(frozen=True, slots=True)
class IngestProgress:
    acknowledged: int
    """Documents of this run acknowledged so far (a contiguous prefix: what a resume would skip)."""
    total: int | None
    """Documents this run sends, when the source can tell (an upper bound for a file)."""
    resumed_after: int
    """Documents an earlier run had acknowledged."""
    batch: BatchAck | None
    """The acknowledgement just recorded; None for the first report, before anything is sent."""


@dataclass(slots=True)
class IngestSummary:
    documents: int = 0
    """Documents acknowledged in this run (rejected ones included)."""
    batches: int = 0
    resumed_after: int = 0
    """Documents skipped because an earlier run had them acknowledged."""
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    """Stored already with the same content hash: nothing written."""
    skipped_unchanged: int = 0
    """Not embedded again: their text was stored with the same model."""
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """(id, reason) of each document the server refused."""
    retries: int = 0
    """Streams opened again after a retryable failure."""
    elapsed_s: float = 0.0

    @property
    def docs_per_s(self) -> float:
        return self.documents / self.elapsed_s if self.elapsed_s > 0 else 0.0


SourceBatch = tuple[list[pb.Document], int]
"""A batch's documents and the source position after them."""
Read = SourceBatch | None
"""None: the source is exhausted."""


@dataclass(frozen=True, slots=True)
class _Batch:
    request: pb.IngestRequest
    end: int
    documents: int


class IngestLedger:
    """Batches read, in flight and acknowledged, the checkpoint, the summary and the progress reports of one
    ingest run. Not thread-safe: the sync stream holds a lock around it."""

    def __init__(
        self,
        source: Source,
        *,
        collection: str,
        target: str,
        limits: Limits,
        batch_size: int,
        window: int,
        truncate: bool,
        checkpoint_file: Path | None,
        resume: bool,
        progress: Callable[[IngestProgress], None] | None,
    ) -> None:
        if batch_size < 1:
            raise InvalidArgument(f"batch_size: must be positive, got {batch_size}")
        if window < 1:
            raise InvalidArgument(f"window: must be positive, got {window}")
        fresh = Checkpoint(source.key, target, collection, batch_id=0, position=0, documents=0)
        loaded = checkpoints.load(checkpoint_file, fresh) if checkpoint_file is not None and resume else None
        self.checkpoint = loaded or fresh
        self.summary = IngestSummary(resumed_after=self.checkpoint.documents)
        self.window = window
        self._truncate = truncate
        self._file = checkpoint_file
        self._progress = progress
        self._total = source.remaining(self.checkpoint.position) if progress is not None else None
        self._batches = self._read(source, limits, min(batch_size, limits.max_request_documents))
        self._next_id = self.checkpoint.batch_id
        self._in_flight: dict[int, _Batch] = {}  # insertion order is batch order
        self._acknowledged: dict[int, _Batch] = {}  # ahead of a gap in the acknowledged prefix
        self._exhausted = False
        self._started = time.perf_counter()
        self._report(None)

    def _read(self, source: Source, limits: Limits, size: int) -> Iterator[SourceBatch]:
        """Batches that fit the limits, whatever their batch id and flags."""
        template = pb.IngestRequest(collection=self.checkpoint.collection, batch_id=(1 << 64) - 1, bulk=True)
        if not self._truncate:
            template.truncate = False
        messages = ((wire.document_message(p.document), p.end) for p in source.read(self.checkpoint.position))
        budget = limits.max_request_bytes - template.ByteSize()
        for run in runs(messages, lambda m: field_size(m[0].ByteSize()), max_count=size, max_bytes=budget):
            yield [m for m, _ in run], run[-1][1]

    def room(self) -> bool:
        return len(self._in_flight) < self.window

    def in_flight(self) -> list[pb.IngestRequest]:
        """What a new stream sends first: the batches a failed stream left unacknowledged, in order."""
        return [batch.request for batch in self._in_flight.values()]

    def read(self) -> Read:
        """The next batch from the source (the only I/O here; done without the caller's lock, so a slow source
        does not hold up acknowledgements). Pass it to `register`, whatever happens: it is read only once."""
        return None if self._exhausted else next(self._batches, None)

    def register(self, read: Read) -> pb.IngestRequest | None:
        """`read` as a batch in flight; None when the source is exhausted."""
        if read is None:
            self._exhausted = True
            return None
        documents, end = read
        self._next_id += 1
        request = pb.IngestRequest(collection=self.checkpoint.collection, batch_id=self._next_id, documents=documents)
        if not self._truncate:
            request.truncate = False
        self._in_flight[self._next_id] = _Batch(request, end, len(documents))
        return request

    def done(self) -> bool:
        return self._exhausted and not self._in_flight

    def acknowledge(self, ack: pb.IngestAck) -> None:
        """Records `ack`: the summary, the checkpoint (saved when it moves), a progress report."""
        batch = self._in_flight.pop(ack.batch_id, None)
        if batch is None:
            raise InferenceFailed(f"the server acknowledged batch {ack.batch_id}, which was not in flight")
        self._acknowledged[ack.batch_id] = batch
        summary = self.summary
        summary.batches += 1
        summary.documents += batch.documents
        summary.inserted += ack.upsert.inserted
        summary.updated += ack.upsert.updated
        summary.unchanged += ack.upsert.unchanged
        summary.skipped_unchanged += ack.skipped_unchanged
        summary.rejected.extend((r.id, r.reason) for r in ack.rejected)
        # The checkpoint moves over the acknowledged prefix only: a gap would be skipped on resume.
        advanced = self.checkpoint
        while (following := self._acknowledged.pop(advanced.batch_id + 1, None)) is not None:
            advanced = dataclasses.replace(
                advanced,
                batch_id=advanced.batch_id + 1,
                position=following.end,
                documents=advanced.documents + following.documents,
            )
        if advanced is not self.checkpoint:
            self.checkpoint = advanced
            if self._file is not None:
                checkpoints.save(self._file, advanced)
        self._report(_batch_ack(ack, batch.documents))

    def _report(self, batch: BatchAck | None) -> None:
        if self._progress is not None:
            acknowledged = self.checkpoint.documents - self.summary.resumed_after
            self._progress(IngestProgress(acknowledged, self._total, self.summary.resumed_after, batch))

    def finish(self) -> IngestSummary:
        """Everything is acknowledged: the checkpoint has nothing left to resume."""
        self.summary.elapsed_s = time.perf_counter() - self._started
        if self._file is not None:
            with contextlib.suppress(FileNotFoundError):
                self._file.unlink()
        return self.summary


class Reopening:
    """When an ingest's stream is opened again after it failed: as any call's attempts, except that a stream
    that had batches acknowledged before it failed starts the retry budget again (a long ingest may outlive
    several replica restarts)."""

    def __init__(self, ledger: IngestLedger, attempts: Attempts) -> None:
        self.ledger = ledger
        self.attempts = attempts
        self._acknowledged = 0

    def target(self) -> int:
        """The target of the next stream."""
        self._acknowledged = self.ledger.summary.batches
        return self.attempts.target()

    def ended(self, failure: Failure | None) -> float:
        """Seconds to wait before the next stream, after one that ended with `failure` (None: it completed).
        Raises the failure's domain error when it is not retried."""
        if failure is None:
            self.attempts.answered()
            return 0.0
        if self.ledger.summary.batches > self._acknowledged:
            self.attempts.progressed()
        delay = self.attempts.failed(failure)
        self.ledger.summary.retries += 1
        return delay


def _batch_ack(ack: pb.IngestAck, documents: int) -> BatchAck:
    return BatchAck(
        batch_id=ack.batch_id,
        documents=documents,
        ids=list(ack.ids),
        inserted=ack.upsert.inserted,
        updated=ack.upsert.updated,
        unchanged=ack.upsert.unchanged,
        skipped_unchanged=ack.skipped_unchanged,
        rejected=[Rejected(r.index, r.id, r.reason) for r in ack.rejected],
    )
