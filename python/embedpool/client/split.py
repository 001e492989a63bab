"""Splitting inputs into calls a server accepts: by document count and by serialized size, in input order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from embedpool.client.types import Limits
from embedpool.v1 import embedpool_pb2 as pb

__all__ = ["embed_requests", "field_size", "id_runs", "runs"]

T = TypeVar("T")


def field_size(size: int) -> int:
    """Bytes a message of `size` bytes takes as an element of a repeated field (numbers below 16): its tag, its
    length as a varint, itself."""
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def runs(items: Iterable[T], size_of: Callable[[T], int], *, max_count: int, max_bytes: int) -> Iterator[list[T]]:
    """Consecutive runs of `items`, each of at most `max_count` items whose sizes add up to at most `max_bytes`.
    An item over `max_bytes` by itself goes alone: the server refuses it with a message naming it, which is
    the caller's to see (splitting cannot make it fit)."""
    run: list[T] = []
    run_bytes = 0
    for item in items:
        size = size_of(item)
        if run and run_bytes + size > max_bytes:
            yield run
            run, run_bytes = [], 0
        run.append(item)
        run_bytes += size
        if len(run) == max_count:  # now, not at the next item: a slow source's full batch goes without waiting
            yield run
            run, run_bytes = [], 0
    if run:
        yield run


def embed_requests(
    documents: Sequence[pb.Document], template: pb.EmbedRequest, limits: Limits
) -> list[pb.EmbedRequest]:
    """`template` (collection, flags, no documents) once per run of `documents` that fits the limits."""
    budget = limits.max_request_bytes - template.ByteSize()
    requests = []
    for run in runs(
        documents,
        lambda d: field_size(d.ByteSize()),
        max_count=limits.max_request_documents,
        max_bytes=budget,
    ):
        request = pb.EmbedRequest()
        request.CopyFrom(template)
        request.documents.extend(run)
        requests.append(request)
    return requests


def id_runs(ids: Sequence[str], collection: str, limits: Limits) -> Iterator[list[str]]:
    """Ids of one DeleteDocuments request after another."""
    budget = limits.max_request_bytes - pb.DeleteDocumentsRequest(collection=collection).ByteSize()
    return runs(ids, lambda i: field_size(len(i.encode())), max_count=limits.max_delete_ids, max_bytes=budget)
