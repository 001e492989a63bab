"""Rust hot paths of embedpool: tokenizing, batch padding and planning, exact top-k cosine search, the
store's binary COPY stream.

Every array is C-contiguous and owned by numpy. Functions release the GIL while they compute, except the
store's helpers (copy_binary, text_faults, json_array_items, stack_vectors, vector_faults): they walk Python
objects or make them as they go, or take less time than a GIL handoff can.
"""

import os
from collections.abc import Sequence
from typing import Self, final

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "InputTooLongError",
    "InternalError",
    "NativeError",
    "Tokenizer",
    "copy_binary",
    "json_array_items",
    "pad_batch",
    "pad_gather",
    "plan_batches",
    "stack_vectors",
    "text_faults",
    "topk_cosine",
    "vector_faults",
]

class NativeError(ValueError):
    """Bad input to the native extension."""

class InternalError(RuntimeError):
    """A bug in the native extension: a Rust panic, caught at its boundary (never pyo3's PanicException)."""

class InputTooLongError(NativeError):
    """A text exceeds the tokenizer's max_length and truncate=False; the message names its index."""

@final
class Tokenizer:
    """A Hugging Face tokenizer.json with its own padding/truncation replaced by ours.

    Texts are truncated at ``max_length`` tokens, special tokens included; rows are padded to the
    longest text rounded up to ``pad_to_multiple_of``. Texts longer than ``max_chars`` characters
    are cut (at whitespace) before tokenizing when that cannot change the kept tokens.
    """

    def __new__(
        cls,
        path: str | os.PathLike[str],
        *,
        max_length: int,
        pad_to_multiple_of: int = 8,
        max_chars: int | None = None,
    ) -> Self: ...
    @property
    def max_length(self) -> int: ...
    @property
    def max_chars(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def pad_to_multiple_of(self) -> int: ...
    def encode(
        self, texts: Sequence[str], *, truncate: bool = True
    ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
        """(ids [n, L], attention_mask [n, L], lengths [n]); raises InputTooLongError if truncate=False."""

    def encode_ragged(
        self, texts: Sequence[str], *, truncate: bool = True
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(flat_ids [total], offsets [n + 1]): text i is flat_ids[offsets[i]:offsets[i + 1]]."""

def pad_batch(
    pieces: Sequence[NDArray[np.int64]], *, pad_id: int, multiple: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Right-pads 1-D id arrays into (ids [b, L], attention_mask [b, L]), L rounded up to multiple."""

def pad_gather(
    ids: Sequence[NDArray[np.int64]],
    offsets: Sequence[NDArray[np.int64]],
    source: NDArray[np.int64],
    document: NDArray[np.int64],
    *,
    pad_id: int,
    multiple: int,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """pad_batch of rows of ragged sources: row k is document document[k] of source source[k], whose ids are
    ids[j][offsets[j][d]:offsets[j][d + 1]]. Raises ValueError for a row that is not there."""

def plan_batches(
    lengths: NDArray[np.int64], *, max_batch_tokens: int, max_batch_size: int, multiple: int
) -> list[NDArray[np.int64]]:
    """Groups positions of ``lengths`` (0 = oldest) into batches, the one holding position 0 first."""

def topk_cosine(
    queries: NDArray[np.float32], corpus: NDArray[np.float32] | NDArray[np.float16], k: int
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Exact cosine top-k: (indices [q, min(k, n)], scores [q, min(k, n)]), best first, ties by lower index."""

def copy_binary(
    first: int | NDArray[np.int64],
    vectors: NDArray[np.float32],
    ids: Sequence[str],
    texts: Sequence[str],
    metadata: Sequence[str],
    hashes: Sequence[bytes],
    *,
    rows: NDArray[np.int64] | None = None,
    chunk_rows: int = 128,
    signature: bool = True,
    trailer: bool = True,
) -> list[bytes]:
    """Postgres binary COPY data for the columns (collection_id int8, embedding vector, id text, text text,
    metadata jsonb, content_hash bytea), in chunks of ``chunk_rows`` whole rows; ``first`` is the int8 of
    every row or of each, ``metadata`` JSON texts. ``vectors`` is C-contiguous [n, dim]: row k's vector is
    ``vectors[rows[k]]``, or ``vectors[k]`` without ``rows``. Values are written as given: check them first
    (``text_faults``, ``vector_faults``). ``signature``/``trailer``: whether the rows start/end the stream (a
    stream encoded a part at a time has the signature in its first part, the trailer in its last)."""

def stack_vectors(values: Sequence[object], dim: int) -> NDArray[np.float32] | None:
    """``values`` as one [len, dim] matrix when each is a C-contiguous 1-D float32 array of ``dim`` values;
    None otherwise (convert them some other way). Consecutive rows of one C-contiguous matrix come back as a
    view of those rows, not a copy."""

def vector_faults(matrix: NDArray[np.float32], *, cosine: bool, float16: bool) -> list[tuple[int, int]]:
    """(row, code) for each row of the [n, dim] ``matrix`` that cannot be stored, one code a row, the first
    that applies: 1 a NaN or infinite value, 2 a value beyond float16 range (checked when ``float16``), 3 all
    zeros (checked when ``cosine``)."""

def text_faults(values: Sequence[object], *, min_bytes: int = 0, max_bytes: int | None = None) -> list[int]:
    """Positions of ``values`` that are not a str of ``min_bytes..max_bytes`` bytes of UTF-8 without U+0000."""

def json_array_items(text: str) -> list[str]:
    """The element texts of a JSON array (its structure is read, not its elements' grammar)."""
