"""`embedpool ingest`: stream a JSONL file or a directory of text files into a collection, resumably.

Documents go out in numbered batches over the bidirectional `Ingest` RPC, at most `window` batches ahead
of the acknowledgements (flow control: the server's backlog and ours stay bounded). After each
acknowledgement the checkpoint file records the last acknowledged batch and where in the source the next
batch starts, so a re-run after a crash resumes there. Batches that were sent but not acknowledged are sent
again; the server's content-hash check makes that harmless (they come back as unchanged, not embedded again).

Sources: a .jsonl file, one object per line, `{"id"?: str, "text": str, "metadata"?: object}` (documents
without an id get one derived from their text by the server); or a directory, every *.txt and *.md file
below it one document, its id the path relative to the directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
from google.protobuf import struct_pb2
from tqdm import tqdm

from embedpool.channel import open_channel
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

__all__ = ["CHECKPOINT_SUFFIX", "IngestSummary", "SourceError", "checkpoint_path", "read_source", "run_ingest"]

CHECKPOINT_SUFFIX: Final = ".embedpool-ingest.json"
_CHECKPOINT_VERSION: Final = 1
_TEXT_SUFFIXES: Final = frozenset({".txt", ".md"})


class SourceError(ValueError):
    """The source cannot be read as documents (bad JSON, missing text, ...); names the file and line."""


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
    elapsed_s: float = 0.0

    @property
    def docs_per_s(self) -> float:
        return self.documents / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class _Doc:
    id: str
    text: str
    metadata: dict[str, Any] | None
    end: int
    """Source position just after this document: a byte offset (JSONL) or a file count (directory)."""


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    source: str
    target: str
    collection: str
    batch_id: int
    """The last acknowledged batch."""
    position: int
    """Where the first unacknowledged document starts."""
    documents: int
    """Documents acknowledged so far, over all runs."""


def checkpoint_path(source: Path, state_dir: Path | None = None) -> Path:
    """`<source>.embedpool-ingest.json` next to the source, or in `state_dir`."""
    source = source.resolve()
    if state_dir is None:
        return source.with_name(source.name + CHECKPOINT_SUFFIX)
    return state_dir / (source.name + CHECKPOINT_SUFFIX)


def read_source(source: Path, start: int = 0) -> Iterator[_Doc]:
    """The documents of `source` from position `start` (0: the beginning)."""
    if source.is_dir():
        yield from _read_directory(source, start)
    else:
        yield from _read_jsonl(source, start)


def _read_jsonl(path: Path, start: int) -> Iterator[_Doc]:
    with path.open("rb") as f:
        if start:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                raise SourceError(f"{path}: the checkpoint's position {start} is not a line start (file changed?)")
        offset = start
        while line := f.readline():
            offset += len(line)
            if not line.strip():
                continue
            where = f"{path}, byte {offset - len(line)}"
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SourceError(f"{where}: not JSON ({e})") from None
            yield _from_object(obj, where, offset)


def _from_object(obj: object, where: str, end: int) -> _Doc:
    if not isinstance(obj, dict):
        raise SourceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text, doc_id, metadata = obj.get("text"), obj.get("id", ""), obj.get("metadata")
    if not isinstance(text, str) or not text:
        raise SourceError(f"{where}: 'text' must be a non-empty string")
    if not isinstance(doc_id, str):
        raise SourceError(f"{where}: 'id' must be a string")
    if metadata is not None and not isinstance(metadata, dict):
        raise SourceError(f"{where}: 'metadata' must be a JSON object")
    return _Doc(doc_id, text, metadata, end)


def _directory_files(root: Path) -> list[Path]:
    files = (p for p in root.rglob("*") if p.suffix in _TEXT_SUFFIXES and p.is_file())
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_directory(root: Path, start: int) -> Iterator[_Doc]:
    for n, path in enumerate(_directory_files(root)[start:], start=start + 1):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SourceError(f"{path}: not UTF-8 ({e})") from None
        if text.strip():
            yield _Doc(path.relative_to(root).as_posix(), text, None, n)


def _count(source: Path, start: int) -> int | None:
    """How many documents are left, for the progress bar's ETA (one quick pass over the file)."""
    if source.is_dir():
        return len(_directory_files(source)) - start
    with source.open("rb") as f:
        f.seek(start)
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _batches(docs: Iterator[_Doc], size: int) -> Iterator[list[_Doc]]:
    batch: list[_Doc] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _request(collection: str, batch_id: int, batch: list[_Doc]) -> pb.IngestRequest:
    documents = []
    for doc in batch:
        document = pb.Document(id=doc.id, text=doc.text)
        if doc.metadata is not None:
            metadata = struct_pb2.Struct()
            metadata.update(doc.metadata)
            document.metadata.CopyFrom(metadata)
        documents.append(document)
    return pb.IngestRequest(collection=collection, batch_id=batch_id, documents=documents)


def _load_checkpoint(path: Path, source: Path, target: str, collection: str) -> _Checkpoint | None:
    """The checkpoint for this source, target and collection; None when there is none (or for another)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: unreadable checkpoint ({e}); delete it to start over") from None
    if data.get("version") != _CHECKPOINT_VERSION:
        return None
    checkpoint = _Checkpoint(**{k: v for k, v in data.items() if k != "version"})
    if (checkpoint.source, checkpoint.target, checkpoint.collection) != (str(source.resolve()), target, collection):
        return None
    return checkpoint


def _save_checkpoint(path: Path, checkpoint: _Checkpoint) -> None:
    """Atomically: a crash leaves the old checkpoint or the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({"version": _CHECKPOINT_VERSION, **_as_dict(checkpoint)}) + "\n")
    os.replace(temporary, path)


def _as_dict(checkpoint: _Checkpoint) -> dict[str, Any]:
    return {name: getattr(checkpoint, name) for name in _Checkpoint.__slots__}


def run_ingest(
    target: str,
    collection: str,
    source: Path,
    *,
    batch_size: int = 256,
    resume: bool = True,
    create: bool = True,
    index: pb.IndexOptions | None = None,
    bulk: bool = True,
    progress: bool = True,
    window: int = 4,
    state_dir: Path | None = None,
    on_ack: Callable[[pb.IngestAck], None] | None = None,
    connect: Callable[[str], grpc.Channel] = open_channel,
) -> IngestSummary:
    """Ingest `source` into `collection` of the server at `target` (host:port); see the module docstring.

    `resume`: continue after the last batch an earlier run had acknowledged (its checkpoint file); False
    starts from the beginning. `create`: create the collection first (idempotent), with `index` options
    (None: an existing collection is used as it is, a new one gets the defaults). `bulk`: an empty collection
    is loaded without its HNSW index, which the server builds when the stream ends. `window`: batches in
    flight. `on_ack` sees each acknowledgement after it is checkpointed; what it raises ends the run.
    `connect` opens the channel to `target` (e.g. `open_channel` with TLS and an API key bound; plaintext by
    default).
    The checkpoint is removed once everything is acknowledged.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    source = Path(source)
    if not source.exists():
        raise SourceError(f"{source}: no such file or directory")
    checkpoint_file = checkpoint_path(source, state_dir)
    checkpoint = _load_checkpoint(checkpoint_file, source, target, collection) if resume else None
    if checkpoint is None:
        checkpoint = _Checkpoint(str(source.resolve()), target, collection, batch_id=0, position=0, documents=0)
    summary = IngestSummary(resumed_after=checkpoint.documents)
    started = time.perf_counter()
    with connect(target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        if create:
            _create(stub, collection, index)
        total = _count(source, checkpoint.position) if progress else None
        with tqdm(total=total, unit="doc", disable=not progress, dynamic_ncols=True, smoothing=0.1) as bar:
            checkpoint = _stream(
                stub, checkpoint, source, batch_size, window, summary, bar, checkpoint_file, on_ack, bulk=bulk
            )
    summary.elapsed_s = time.perf_counter() - started
    with contextlib.suppress(FileNotFoundError):
        checkpoint_file.unlink()
    return summary


def _create(stub: pb_grpc.EmbedderStub, collection: str, index: pb.IndexOptions | None) -> None:
    try:
        stub.CreateCollection(pb.CreateCollectionRequest(name=collection, index=index))
    except grpc.RpcError as e:
        # Options not asked for: a collection that exists with its own is what the caller wants.
        if index is not None or e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


def _stream(
    stub: pb_grpc.EmbedderStub,
    checkpoint: _Checkpoint,
    source: Path,
    batch_size: int,
    window: int,
    summary: IngestSummary,
    bar: tqdm[Any],
    checkpoint_file: Path,
    on_ack: Callable[[pb.IngestAck], None] | None,
    *,
    bulk: bool,
) -> _Checkpoint:
    """Send every batch, record every acknowledgement; the last checkpoint."""
    slots = threading.BoundedSemaphore(window)
    sent: dict[int, tuple[int, int]] = {}  # batch id -> (position after it, documents in it)
    sent_lock = threading.Lock()
    stop = threading.Event()

    def requests() -> Iterator[pb.IngestRequest]:
        # Runs on gRPC's thread: it blocks here, not in the main thread, while `window` batches are in flight.
        batch_id = checkpoint.batch_id
        for batch in _batches(read_source(source, checkpoint.position), batch_size):
            while not slots.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            batch_id += 1
            with sent_lock:
                sent[batch_id] = (batch[-1].end, len(batch))
            request = _request(collection=checkpoint.collection, batch_id=batch_id, batch=batch)
            request.bulk = bulk and batch_id == checkpoint.batch_id + 1  # the first message carries it
            yield request

    acked: dict[int, tuple[int, int]] = {}
    acks = stub.Ingest(requests())
    try:
        for ack in acks:
            with sent_lock:
                if ack.batch_id not in sent:
                    raise RuntimeError(f"the server acknowledged batch {ack.batch_id}, which was not in flight")
                acked[ack.batch_id] = sent.pop(ack.batch_id)
            slots.release()
            _account(summary, ack, acked[ack.batch_id][1])
            # The checkpoint moves over the acknowledged prefix only: a gap would be skipped on resume.
            advanced = checkpoint
            while (following := advanced.batch_id + 1) in acked:
                position, count = acked.pop(following)
                advanced = dataclasses.replace(
                    advanced, batch_id=following, position=position, documents=advanced.documents + count
                )
            if advanced is not checkpoint:
                _save_checkpoint(checkpoint_file, advanced)
                bar.update(advanced.documents - checkpoint.documents)
                checkpoint = advanced
            if on_ack is not None:
                on_ack(ack)
    except BaseException:
        acks.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves RpcContext.cancel untyped
        raise
    finally:
        stop.set()
    return checkpoint


def _account(summary: IngestSummary, ack: pb.IngestAck, count: int) -> None:
    summary.batches += 1
    summary.documents += count
    summary.inserted += ack.upsert.inserted
    summary.updated += ack.upsert.updated
    summary.unchanged += ack.upsert.unchanged
    summary.skipped_unchanged += ack.skipped_unchanged
    summary.rejected.extend((r.id, r.reason) for r in ack.rejected)
