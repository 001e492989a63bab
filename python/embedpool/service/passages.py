"""Long documents stored as their windows (long_inputs chunk with store_windows): each window a row of its own,
`{id}#w{k}`, whose text is the window's stretch of the document and whose metadata links it to the document, so a
search finds the passage, not just the document (Search's best_window_per_parent keeps one per document)."""

from __future__ import annotations

from collections.abc import Sequence

from embedpool.errors import InvalidArgument
from embedpool.pool.windows import Chunking, Splitter
from embedpool.service.documents import Document, Hit
from embedpool.service.writes import derived_id

WINDOW_KEYS = ("parent_id", "window", "windows", "token_start", "token_end", "char_start", "char_end")
"""Metadata every window row gets (over the document's own keys of these names)."""


def window_id(parent: str, k: int) -> str:
    return f"{parent}#w{k}"


def windows_as_documents(
    documents: Sequence[Document], splitter: Splitter, chunking: Chunking
) -> tuple[list[Document], dict[str, int]]:
    """Each document's windows, as documents to store; and, by document id, its number of windows (of its last
    version in the request, which is the one stored)."""
    out: list[Document] = []
    counts: dict[str, int] = {}
    for i, doc in enumerate(documents):
        parent = doc.id or derived_id(doc.text)
        passages = splitter.passages(doc.text, chunking.overlap)
        if len(out) + len(passages) > chunking.max_windows:
            raise InvalidArgument(
                f"documents[{i}].text: {len(passages)} windows: the request would pass its limit of"
                f" {chunking.max_windows} windows (max_windows)"
            )
        for k, p in enumerate(passages):
            link = (parent, k, len(passages), p.token_start, p.token_end, p.char_start, p.char_end)
            metadata = {**(doc.metadata or {}), **dict(zip(WINDOW_KEYS, link, strict=True))}
            out.append(Document(doc.text[p.char_start : p.char_end], window_id(parent, k), metadata))
        counts[parent] = len(passages)
    return out, counts


def stale_window_ids(counts: dict[str, int], most: int) -> list[str]:
    """Ids a document's earlier, longer versions may have left: windows past its current count, up to `most` (the
    server's max_windows_per_request, which bounded every earlier write)."""
    return [window_id(parent, k) for parent, count in counts.items() for k in range(count, most)]


def best_per_parent(hits: Sequence[Hit], k: int) -> list[Hit]:
    """The first (best) hit of each document, a window's document being its parent_id, up to `k`."""
    seen: set[str] = set()
    out: list[Hit] = []
    for hit in hits:
        parent = hit.metadata.get("parent_id")
        key = parent if isinstance(parent, str) else hit.id
        if key not in seen:
            seen.add(key)
            out.append(hit)
            if len(out) == k:
                break
    return out
