"""A typed Python client of the embedpool gRPC API: `Client` (sync) and `AsyncClient` (asyncio).

Both split inputs larger than the server's limits into several calls and put the results back in order, retry
RESOURCE_EXHAUSTED and UNAVAILABLE within the caller's deadline, take several replicas in turn (skipping one
that is down), and raise embedpool.errors' domain errors. Vectors come back as float32 numpy arrays.

    with Client("127.0.0.1:50051") as client:
        client.create_collection("docs", exist_ok=True)
        client.upsert("docs", [Document("first passage", id="p1"), "a passage without id"])
        hits = client.search("docs", "which passage comes first?", k=3)
"""

from embedpool.client.aio import AsyncClient
from embedpool.client.checkpoint import CheckpointError, checkpoint_path
from embedpool.client.ingest import BatchAck, IngestProgress, IngestSummary, IterableSource, Positioned, Source
from embedpool.client.retry import RetryPolicy
from embedpool.client.sources import FileSource, SourceError
from embedpool.client.sync import Client
from embedpool.client.types import (
    Collection,
    Document,
    Encoding,
    Hit,
    IndexOptions,
    Limits,
    ModelInfo,
    Rejected,
    Sync,
    UpsertResult,
)

__all__ = [
    "AsyncClient",
    "BatchAck",
    "CheckpointError",
    "Client",
    "Collection",
    "Document",
    "Encoding",
    "FileSource",
    "Hit",
    "IndexOptions",
    "IngestProgress",
    "IngestSummary",
    "IterableSource",
    "Limits",
    "ModelInfo",
    "Positioned",
    "Rejected",
    "RetryPolicy",
    "Source",
    "SourceError",
    "Sync",
    "UpsertResult",
    "checkpoint_path",
]
