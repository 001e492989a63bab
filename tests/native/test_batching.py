"""pad_batch, pad_gather and plan_batches: round trips and scheduling invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedpool._native import NativeError, Tokenizer, pad_batch, pad_gather, plan_batches

id_rows = st.lists(st.lists(st.integers(0, 30_000), max_size=40), max_size=12)


@given(id_rows, st.integers(1, 16), st.integers(0, 5))
def test_pad_batch_round_trips(rows: list[list[int]], multiple: int, pad_id: int) -> None:
    flat = np.array([t for r in rows for t in r], dtype=np.int64)
    offsets = np.cumsum([0, *map(len, rows)])
    pieces = [flat[offsets[i] : offsets[i + 1]] for i in range(len(rows))]
    ids, mask = pad_batch(pieces, pad_id=pad_id, multiple=multiple)
    longest = max(map(len, rows), default=0)
    assert ids.shape == mask.shape == (len(rows), -(-longest // multiple) * multiple)
    for i, row in enumerate(rows):
        assert ids[i, : len(row)].tolist() == row
        assert (ids[i, len(row) :] == pad_id).all()
        assert mask[i].tolist() == [1] * len(row) + [0] * (ids.shape[1] - len(row))


@given(st.lists(id_rows, min_size=1, max_size=5), st.data(), st.integers(1, 16))
def test_pad_gather_is_pad_batch_of_the_rows_it_names(
    sources: list[list[list[int]]], data: st.DataObject, multiple: int
) -> None:
    """Rows picked out of several callers' ragged ids, in any order and any number of times, pad as the same rows
    handed to pad_batch one by one."""
    flats = [np.array([t for r in rows for t in r], dtype=np.int64) for rows in sources]
    offsets = [np.cumsum([0, *map(len, rows)]).astype(np.int64) for rows in sources]
    named = [(j, d) for j, rows in enumerate(sources) for d in range(len(rows))]
    picked = data.draw(st.lists(st.sampled_from(named), max_size=20)) if named else []
    source = np.array([j for j, _ in picked], dtype=np.int64)
    document = np.array([d for _, d in picked], dtype=np.int64)
    ids, mask = pad_gather(flats, offsets, source, document, pad_id=7, multiple=multiple)
    pieces = [flats[j][offsets[j][d] : offsets[j][d + 1]] for j, d in picked]
    expected_ids, expected_mask = pad_batch(pieces, pad_id=7, multiple=multiple)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(mask, expected_mask)


def test_pad_gather_refuses_rows_that_are_not_there() -> None:
    flat, offsets = np.arange(5, dtype=np.int64), np.array([0, 2, 5], dtype=np.int64)
    one = np.array([0], dtype=np.int64)
    for source, document in ((one, np.array([2])), (np.array([1]), one), (np.array([-1]), one), (one, one[:0])):
        with pytest.raises(ValueError):
            pad_gather([flat], [offsets], source, document.astype(np.int64), pad_id=0, multiple=1)
    with pytest.raises(ValueError):
        pad_gather([flat], [], one, one, pad_id=0, multiple=1)


def test_pad_batch_accepts_strided_views() -> None:
    base = np.arange(20, dtype=np.int64)
    ids, mask = pad_batch([base[::2], base[1:4]], pad_id=-1, multiple=4)
    assert ids.tolist() == [[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, -1, -1], [1, 2, 3] + [-1] * 9]
    assert mask.sum() == 13


def test_pad_batch_matches_encode(minilm: Tokenizer) -> None:
    texts = ["a short one", "", "a somewhat longer sentence with more tokens in it"]
    ids, mask, _ = minilm.encode(texts)
    flat, offsets = minilm.encode_ragged(texts)
    pieces = [flat[offsets[i] : offsets[i + 1]] for i in range(len(texts))]
    padded_ids, padded_mask = pad_batch(pieces, pad_id=minilm.pad_id, multiple=minilm.pad_to_multiple_of)
    np.testing.assert_array_equal(padded_ids, ids)
    np.testing.assert_array_equal(padded_mask, mask)


def test_pad_batch_rejects_bad_multiple() -> None:
    with pytest.raises(NativeError):
        pad_batch([np.zeros(3, dtype=np.int64)], pad_id=0, multiple=0)


@given(
    st.lists(st.integers(0, 600), max_size=80),
    st.integers(1, 4096),
    st.integers(1, 64),
    st.sampled_from([1, 8, 16]),
)
def test_plan_batches_invariants(lengths: list[int], max_tokens: int, max_size: int, multiple: int) -> None:
    array = np.array(lengths, dtype=np.int64)
    batches = plan_batches(array, max_batch_tokens=max_tokens, max_batch_size=max_size, multiple=multiple)
    assert all(b.dtype == np.int64 for b in batches)
    seen = np.sort(np.concatenate([*batches, np.empty(0, dtype=np.int64)]))
    np.testing.assert_array_equal(seen, np.arange(len(lengths)))
    for batch in batches:
        assert len(batch) >= 1
        if len(batch) > 1:
            assert len(batch) <= max_size
            assert -(-array[batch].max() // multiple) * multiple * len(batch) <= max_tokens
    if lengths:
        assert 0 in batches[0]


def test_plan_batches_groups_similar_lengths() -> None:
    lengths = np.array([100, 3, 90, 4, 95, 5], dtype=np.int64)
    batches = plan_batches(lengths, max_batch_tokens=320, max_batch_size=8, multiple=8)
    assert [sorted(b.tolist()) for b in batches] == [[0, 2, 4], [1, 3, 5]]


def test_plan_batches_rejects_bad_input() -> None:
    lengths = np.array([1, 2], dtype=np.int64)
    with pytest.raises(NativeError):
        plan_batches(np.array([1, -2], dtype=np.int64), max_batch_tokens=8, max_batch_size=8, multiple=8)
    with pytest.raises(NativeError):
        plan_batches(lengths, max_batch_tokens=0, max_batch_size=8, multiple=8)
    with pytest.raises(NativeError):
        plan_batches(lengths, max_batch_tokens=8, max_batch_size=0, multiple=8)
    with pytest.raises(NativeError):
        plan_batches(lengths, max_batch_tokens=8, max_batch_size=8, multiple=0)
