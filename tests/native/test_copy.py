"""rust/copy.rs against the Python encoder it replaced: the same bytes for any rows, and the checks and helpers
around it against their Python definitions."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

from embedpool._native import NativeError, copy_binary, json_array_items, stack_vectors, text_faults, vector_faults
from embedpool.store.writer import json_object

_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_LENGTH = struct.Struct(">i").pack


def reference_copy(
    first: int | NDArray[np.int64],
    vectors: NDArray[np.float32],
    ids: list[str],
    texts: list[str],
    metadata: list[str],
    hashes: list[bytes],
    chunk_rows: int = 128,
) -> Iterator[bytearray]:
    """The writer's encoder before rust/copy.rs (python/embedpool/store/writer.py, copy_chunks), unchanged but
    for taking str columns and the chunk size."""
    n, dim = vectors.shape
    head = np.empty(
        n,
        dtype=np.dtype(
            [
                ("fields", ">i2"),
                ("first_len", ">i4"),
                ("first", ">i8"),
                ("vector_len", ">i4"),
                ("dim", ">u2"),
                ("unused", ">u2"),
                ("vector", ">f4", (dim,)),
            ]
        ),
    )
    head["fields"], head["first_len"], head["first"] = 6, 8, first
    head["vector_len"], head["dim"], head["unused"] = 4 + 4 * dim, dim, 0
    head["vector"] = vectors
    heads, size = head.view(np.uint8).data, head.dtype.itemsize
    out = bytearray(_SIGNATURE)
    for k, (doc_id, text, meta, digest) in enumerate(zip(ids, texts, metadata, hashes, strict=True)):
        out += heads[k * size : (k + 1) * size]
        for value in (doc_id.encode(), text.encode()):
            out += _LENGTH(len(value)) + value
        out += _LENGTH(len(meta.encode()) + 1) + b"\x01" + meta.encode()
        out += _LENGTH(len(digest)) + digest
        if k % chunk_rows == chunk_rows - 1:
            yield out
            out = bytearray()
    out += struct.pack(">h", -1)
    yield out


# Any Unicode Postgres text holds (astral planes included), and NUL: the encoder writes what it is given.
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
# jsonb cannot hold U+0000 (json_object refuses it).
JSON_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | JSON_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(JSON_TEXT, inner, max_size=3),
    max_leaves=8,
)
METADATA = st.dictionaries(JSON_TEXT, JSON_VALUE, max_size=4)
# Every float32 bit pattern that is a number: -0.0, denormals, the extremes.
FLOAT32 = st.floats(width=32, allow_nan=False) | st.sampled_from([-0.0, 1e-45, -1e-45, 1.1754942e-38])


@st.composite
def batches(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 9))
    dim = draw(st.integers(1, 5))
    first: int | NDArray[np.int64] = draw(
        st.integers(-(2**63), 2**63 - 1) | st.just(np.arange(n, dtype=np.int64) * draw(st.integers(-5, 5)))
    )
    return {
        "first": first,
        "vectors": draw(hnp.arrays(np.float32, (n, dim), elements=FLOAT32)),
        "ids": draw(st.lists(TEXT, min_size=n, max_size=n)),
        "texts": draw(st.lists(TEXT, min_size=n, max_size=n)),
        "metadata": [json_object(m, "metadata") for m in draw(st.lists(METADATA, min_size=n, max_size=n))],
        "hashes": draw(st.lists(st.binary(max_size=40), min_size=n, max_size=n)),
        "chunk_rows": draw(st.integers(1, 4)),
    }


@given(batch=batches())
def test_rust_copy_stream_is_byte_identical_to_the_python_encoder(batch: dict[str, Any]) -> None:
    chunks = copy_binary(**batch)
    assert b"".join(chunks) == b"".join(reference_copy(**batch))
    # Whole rows per chunk (the old encoder also sent the trailer alone after a full last chunk).
    rows = len(batch["ids"])
    assert len(chunks) == max(1, -(-rows // batch["chunk_rows"]))


def test_a_full_size_batch_is_byte_identical_too() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((300, 384)).astype(np.float32)
    vectors[0, :3] = np.array([-0.0, 1e-45, 3.4028235e38], np.float32)
    ids = [f"doc-{i}-🦀" for i in range(300)]
    texts = ["ä" * i for i in range(300)]
    metadata = [json_object({"n": i, "t": ["x", {"y": None}]}, "m") for i in range(300)]
    hashes = [bytes([i % 256]) * 32 for i in range(300)]
    for first in (7, np.arange(300, dtype=np.int64)):
        chunks = copy_binary(first, vectors, ids, texts, metadata, hashes)
        expected = reference_copy(first, vectors, ids, texts, metadata, hashes)
        assert chunks == [bytes(c) for c in expected]  # 128 + 128 + 44 rows


def test_mismatched_columns_are_refused() -> None:
    vectors = np.ones((2, 3), np.float32)
    with pytest.raises(NativeError, match="texts"):
        copy_binary(1, vectors, ["a", "b"], ["a"], ["{}", "{}"], [b"", b""])
    with pytest.raises(NativeError, match="C-contiguous"):
        copy_binary(1, np.ones((3, 2), np.float32).T, ["a", "b"], ["a", "b"], ["{}", "{}"], [b"", b""])
    with pytest.raises(NativeError, match="first"):
        copy_binary(np.arange(3, dtype=np.int64), vectors, ["a", "b"], ["a", "b"], ["{}", "{}"], [b"", b""])
    with pytest.raises(NativeError, match="hashes"):
        copy_binary(1, vectors, ["a", "b"], ["a", "b"], ["{}", "{}"], ["x", "y"])  # type: ignore[list-item]
    with pytest.raises(NativeError, match="not valid Unicode"):
        copy_binary(1, vectors, ["a", "\ud800"], ["a", "b"], ["{}", "{}"], [b"", b""])


@given(values=st.lists(METADATA | JSON_VALUE, max_size=6))
def test_json_array_items_are_each_value_encoded_alone(values: list[Any]) -> None:
    encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    assert json_array_items(encoder.encode(values)) == [encoder.encode(v) for v in values]


def test_json_array_items_refuses_what_is_not_an_array() -> None:
    for text in ["{}", "[1,]", '["]', "[[]"]:
        with pytest.raises(NativeError):
            json_array_items(text)


def _fits(value: object, low: int, high: int) -> bool:
    try:
        encoded = value.encode() if isinstance(value, str) else None
    except UnicodeEncodeError:
        return False
    return encoded is not None and low <= len(encoded) <= high and b"\x00" not in encoded


@given(
    values=st.lists(st.text(max_size=6) | st.binary(max_size=2) | st.none() | st.integers(), max_size=8),
    low=st.integers(0, 3),
    high=st.integers(0, 12),
)
def test_text_faults_are_the_values_python_would_refuse(values: list[object], low: int, high: int) -> None:
    assert text_faults(values, min_bytes=low, max_bytes=high) == [
        k for k, v in enumerate(values) if not _fits(v, low, high)
    ]
    assert text_faults(values) == [k for k, v in enumerate(values) if not _fits(v, 0, 1 << 62)]


def test_stack_vectors_takes_only_contiguous_native_float32_rows() -> None:
    matrix = np.arange(12, dtype=np.float32).reshape(4, 3)
    stacked = stack_vectors(list(matrix), 3)
    assert stacked is not None and stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked, matrix)
    empty = stack_vectors([], 3)
    assert empty is not None and empty.shape == (0, 3)
    for odd in (
        [matrix[0], matrix[1].astype(">f4")],
        [matrix[0], matrix[1].astype(np.float64)],
        [matrix[0], matrix[1, :2]],
        [matrix[0], matrix.T[0]],  # strided
        [matrix[0], [1.0, 2.0, 3.0]],
        [matrix[:1]],  # 2-D
    ):
        assert stack_vectors(odd, 3) is None


@pytest.mark.parametrize(
    "rows",
    [
        lambda m: list(m),
        lambda m: list(m[1:3]),  # a run of rows inside the matrix
        lambda m: list(m[1:][1:]),  # a view of a view: the memory's owner is two arrays up
        lambda m: list(m.reshape(2, 2, 3)[1]),  # rows of a reshaped owner
    ],
)
def test_stack_vectors_views_consecutive_rows_of_one_matrix(rows: Any) -> None:
    matrix = np.arange(12, dtype=np.float32).reshape(4, 3)
    values = rows(matrix)
    stacked = stack_vectors(values, 3)
    assert stacked is not None and stacked.shape == (len(values), 3) and stacked.flags.c_contiguous
    assert np.shares_memory(stacked, matrix)
    np.testing.assert_array_equal(stacked, np.stack(values))


@pytest.mark.parametrize(
    "rows",
    [
        lambda m: [m[0], m[2]],  # a gap
        lambda m: [m[1], m[0]],  # out of order
        lambda m: [m[0], m[0]],  # repeated
        lambda m: list(np.zeros((4, 6), np.float32)[:, :3]),  # rows of a wider matrix
        lambda m: [m[0], m[1].copy()],  # two owners
    ],
)
def test_stack_vectors_copies_anything_else(rows: Any) -> None:
    matrix = np.arange(12, dtype=np.float32).reshape(4, 3)
    values = rows(matrix)
    stacked = stack_vectors(values, 3)
    assert stacked is not None and not np.shares_memory(stacked, matrix)
    np.testing.assert_array_equal(stacked, np.stack(values))


def _numpy_faults(matrix: NDArray[np.float32], cosine: bool, float16: bool) -> list[tuple[int, int]]:
    finite = np.isfinite(matrix).all(axis=1)
    fits = finite & (np.abs(matrix) <= 65504.0).all(axis=1) if float16 else finite
    nonzero = matrix.any(axis=1) if cosine else np.ones(len(matrix), bool)
    codes = np.where(~finite, 1, np.where(~fits, 2, np.where(~nonzero, 3, 0)))
    return [(n, int(codes[n])) for n in np.flatnonzero(codes).tolist()]


_SPECIAL = st.sampled_from([0.0, -0.0, np.nan, np.inf, -np.inf, 65504.0, -65504.0, 65505.0, 1e-45, 3e38, -1.0])


@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=6),
        elements=st.one_of(_SPECIAL, st.floats(width=32)),
    ),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_vector_faults_agree_with_numpy(
    matrix: NDArray[np.float32], cosine: bool, float16: bool, fortran: bool
) -> None:
    given_matrix = np.asfortranarray(matrix) if fortran else matrix
    if matrix.shape[1] == 0:
        assert vector_faults(given_matrix, cosine=cosine, float16=float16) == []
        return
    assert vector_faults(given_matrix, cosine=cosine, float16=float16) == _numpy_faults(matrix, cosine, float16)


def test_rows_pick_the_vectors_without_a_copy_in_order() -> None:
    vectors = np.random.default_rng(5).standard_normal((5, 3)).astype(np.float32)
    picks = np.array([4, 0, 2], dtype=np.int64)
    columns = (["a", "b", "c"], ["x", "y", "z"], ["{}"] * 3, [b"1", b"2", b"3"])
    assert copy_binary(9, vectors, *columns, rows=picks) == copy_binary(9, vectors[picks], *columns)
    for bad in ([5, 0, 2], [-1, 0, 2], [0, 1]):
        with pytest.raises(NativeError, match="row"):
            copy_binary(9, vectors, *columns, rows=np.array(bad, dtype=np.int64))
