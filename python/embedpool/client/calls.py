"""What each client method sends and how the replies of its (possibly several) calls come together; shared by
the sync and the async client, which differ only in how they make the calls."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from embedpool.client import split, wire
from embedpool.client.types import Document, IndexOptions, Limits, Rejected, UpsertResult
from embedpool.errors import InvalidArgument
from embedpool.v1 import embedpool_pb2 as pb

__all__ = [
    "EmbedPlan",
    "create_request",
    "delete_requests",
    "documents",
    "embed_plan",
    "search_request",
    "shifted",
    "texts",
    "upsert_result",
]

_DOCUMENT_INDEX = re.compile(r"\bdocuments\[(\d+)\]")


def texts(values: Sequence[str]) -> list[pb.Document]:
    if isinstance(values, str):  # a str is a Sequence[str]: one string would be embedded a character at a time
        raise InvalidArgument("texts: expected a sequence of strings, got one string")
    return [pb.Document(text=t) for t in values]


def documents(values: Iterable[Document | str]) -> list[pb.Document]:
    if isinstance(values, str):
        raise InvalidArgument("documents: expected a sequence of documents, got one string")
    return [wire.document_message(d) for d in values]


@dataclass(frozen=True, slots=True)
class EmbedPlan:
    requests: list[pb.EmbedRequest]
    offsets: list[int]
    """Input index of each request's first document."""
    count: int
    encoding: str = "float32"
    """As wire.ENCODINGS names it."""

    def vectors(self, replies: Sequence[pb.EmbedResponse], dim: int) -> NDArray[np.float32]:
        """[count, dim] in input order; `dim` is used when there is no reply (no input). For encoding "binary":
        uint8 [count, ceil(dim / 8)] packed sign bits."""
        width = wire.row_width(replies[0].dim if replies else dim, self.encoding)
        out = np.empty((self.count, width), dtype=np.uint8 if self.encoding == "binary" else np.float32)
        for offset, reply in zip(self.offsets, replies, strict=True):
            wire.vectors_into(out, offset, reply.vectors, self.encoding)
        return out  # uint8 where the caller asked for binary: its embed() overloads say so


def embed_plan(
    docs: list[pb.Document],
    limits: Limits,
    *,
    collection: str = "",
    truncate: bool = True,
    dimensions: int | None = None,
    skip_vectors: bool = False,
    model: str = "",
    input_type: str = "",
    encoding: str = "float32",
) -> EmbedPlan:
    template = pb.EmbedRequest(
        collection=collection,
        skip_vectors=skip_vectors,
        encoding=wire.encoding(encoding),
        model=model or "",
        input_type=input_type or "",
    )
    if not truncate:
        template.truncate = False
    if dimensions is not None:
        template.dimensions = dimensions
    requests = split.embed_requests(docs, template, limits)
    offsets, start = [], 0
    for request in requests:
        offsets.append(start)
        start += len(request.documents)
    return EmbedPlan(requests, offsets, len(docs), encoding)


def upsert_result(plan: EmbedPlan, replies: Sequence[pb.EmbedResponse], *, with_vectors: bool) -> UpsertResult:
    ids: list[str] = []
    rejected: list[Rejected] = []
    inserted = updated = unchanged = 0
    for offset, reply in zip(plan.offsets, replies, strict=True):
        ids.extend(reply.ids)
        inserted += reply.upsert.inserted
        updated += reply.upsert.updated
        unchanged += reply.upsert.unchanged
        rejected.extend(Rejected(offset + r.index, r.id, r.reason) for r in reply.rejected)
    vectors = plan.vectors(replies, 0) if with_vectors else None
    return UpsertResult(ids, inserted, updated, unchanged, rejected, vectors)


def shifted(error: InvalidArgument, offset: int) -> InvalidArgument:
    """`error` of a split call, its `documents[i]` renumbered as the caller's input counts."""
    if not offset:
        return error
    message = _DOCUMENT_INDEX.sub(lambda m: f"documents[{int(m.group(1)) + offset}]", str(error))
    return type(error)(message)


def search_request(
    collection: str,
    query: str | ArrayLike,
    *,
    k: int,
    filter: Mapping[str, Any] | None,
    candidates: int | None,
    min_score: float | None,
    include_vectors: bool,
    encoding: str = "float32",
) -> pb.SearchRequest:
    request = pb.SearchRequest(
        collection=collection,
        k=k,
        candidates=candidates or 0,
        include_vectors=include_vectors,
        encoding=wire.encoding(encoding),
    )
    if isinstance(query, str):
        request.text = query
    else:
        request.vector = wire.vector_bytes(query)
    if filter:
        request.filter.CopyFrom(wire.struct(filter, "filter"))
    if min_score is not None:
        request.min_score = min_score
    return request


def delete_requests(
    collection: str, ids: Sequence[str] | None, filter: Mapping[str, Any] | None, limits: Limits
) -> list[pb.DeleteDocumentsRequest]:
    """Ids split by the limits; a filter (or nothing, or both: the server says what is wrong) in one request."""
    if isinstance(ids, str):
        raise InvalidArgument("ids: expected a sequence of ids, got one string")
    template = pb.DeleteDocumentsRequest(collection=collection)
    if filter:
        template.filter.CopyFrom(wire.struct(filter, "filter"))
    if not ids:
        return [template]
    requests = []
    for run in split.id_runs(ids, collection, limits):
        request = pb.DeleteDocumentsRequest()
        request.CopyFrom(template)
        request.ids.extend(run)
        requests.append(request)
    return requests


def create_request(
    name: str, index: IndexOptions | None, storage: str = "float32", dimensions: int | None = None, model: str = ""
) -> pb.CreateCollectionRequest:
    request = pb.CreateCollectionRequest(
        name=name, index=wire.index_message(index) if index is not None else None, storage=storage, model=model
    )
    if dimensions is not None:
        request.dimensions = dimensions
    return request
