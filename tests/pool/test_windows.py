"""Windows of long inputs (pool.windows): coverage of every token, the cap, and pooling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedpool.errors import InvalidArgument
from embedpool.pool.windows import Chunking, Specials, Windows, pooled, spans, split

SPECIALS = Specials(np.array([101]), np.array([102]))


@given(content=st.integers(0, 5000), width=st.integers(2, 600), data=st.data())
def test_windows_cover_every_token_in_order(content: int, width: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, width - 1))
    windows = spans(content, width, overlap)
    assert windows[0][0] == 0 and windows[-1][1] == content
    assert all(0 < end - start <= width or content == 0 for start, end in windows)
    for (a0, a1), (b0, b1) in itertools.pairwise(windows):
        assert a1 - a0 == width  # only the last is short
        assert b0 == a0 + width - overlap  # each overlaps the one before by exactly `overlap`
        assert b1 > a1
    assert len(windows) == 1 + max(0, -(-(content - width) // (width - overlap)))


@given(lengths=st.lists(st.integers(0, 900), min_size=1, max_size=6), overlap=st.integers(0, 60))
def test_split_keeps_each_document_in_its_windows(lengths: list[int], overlap: int) -> None:
    max_length, width = 64, 62
    documents = [np.arange(1000 * d, 1000 * d + n, dtype=np.int64) for d, n in enumerate(lengths)]
    ids = np.concatenate([np.concatenate([[101], doc, [102]]) for doc in documents])
    offsets = np.concatenate([[0], np.cumsum([n + 2 for n in lengths])]).astype(np.int64)
    windows = split(ids, offsets, SPECIALS, max_length, Chunking(overlap=overlap, max_windows=10_000))
    assert windows.token_counts.tolist() == [n + 2 for n in lengths]
    assert windows.counts.sum() == len(windows) == len(windows.offsets) - 1
    w = 0
    for doc, count in zip(documents, windows.counts.tolist(), strict=True):
        covered: list[int] = []
        for start, end in spans(len(doc), width, overlap):
            row = windows.ids[windows.offsets[w] : windows.offsets[w + 1]]
            assert row[0] == 101 and row[-1] == 102 and len(row) <= max_length
            assert row[1:-1].tolist() == doc[start:end].tolist()
            assert windows.weights[w] == end - start
            covered += row[1:-1].tolist()
            w += 1
        assert sorted(set(covered)) == doc.tolist()
        assert count == len(spans(len(doc), width, overlap))


@given(lengths=st.lists(st.integers(0, 400), min_size=1, max_size=4), prompt=st.integers(1, 20))
def test_a_prompt_starts_every_window_and_takes_its_room(lengths: list[int], prompt: int) -> None:
    max_length = 64
    width = max_length - 2 - prompt
    tokens = np.arange(50_000, 50_000 + prompt, dtype=np.int64)
    documents = [np.arange(1000 * d, 1000 * d + n, dtype=np.int64) for d, n in enumerate(lengths)]
    ids = np.concatenate([np.concatenate([[101], doc, [102]]) for doc in documents])
    offsets = np.concatenate([[0], np.cumsum([n + 2 for n in lengths])]).astype(np.int64)
    windows = split(ids, offsets, SPECIALS, max_length, Chunking(overlap=3, max_windows=10_000), tokens)
    assert windows.token_counts.tolist() == [n + 2 + prompt for n in lengths]  # the prompt counted once
    w = 0
    for doc in documents:
        for start, end in spans(len(doc), width, 3):
            row = windows.ids[windows.offsets[w] : windows.offsets[w + 1]].tolist()
            assert row == [101, *tokens.tolist(), *doc[start:end].tolist(), 102] and len(row) <= max_length
            assert windows.weights[w] == end - start  # weighted by the document's tokens, not the prompt's
            w += 1
    assert w == len(windows)


def test_a_prompt_that_leaves_no_room_is_refused() -> None:
    ids, offsets = np.array([101, 5, 6, 102]), np.array([0, 4])
    with pytest.raises(InvalidArgument, match=r"must be below the 2 tokens of a window \(the prompt takes 60\)"):
        split(ids, offsets, SPECIALS, 64, Chunking(overlap=2), np.arange(60))


def test_split_names_the_document_past_the_cap() -> None:
    ids = np.concatenate([[101], np.arange(10), [102], [101], np.arange(200), [102]]).astype(np.int64)
    offsets = np.array([0, 12, 214])
    with pytest.raises(InvalidArgument, match=r"^text 1 is 200 tokens, 4 windows"):
        split(ids, offsets, SPECIALS, 64, Chunking(max_windows=4))
    assert len(split(ids, offsets, SPECIALS, 64, Chunking(max_windows=5))) == 5


def test_pooling_weights_windows_by_their_tokens() -> None:
    vectors = np.array([[1, 0], [0, 1], [0, 1]], dtype=np.float32)
    windows = Windows(
        ids=np.empty(0, np.int64),
        offsets=np.zeros(4, np.int64),
        weights=np.array([3, 1, 5], dtype=np.float32),
        counts=np.array([2, 1]),
        token_counts=np.array([6, 7]),
    )
    out = pooled(vectors, windows)
    np.testing.assert_allclose(out, np.array([[0.9486833, 0.31622777], [0.0, 1.0]], dtype=np.float32), rtol=1e-6)


def test_specials_split_at_the_text() -> None:
    specials = Specials.of(np.array([0, 2]), np.array([0, 17, 2]))
    assert specials.prefix.tolist() == [0] and specials.suffix.tolist() == [2] and len(specials) == 2
