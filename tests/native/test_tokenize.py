"""Tokenizer: golden ids, agreement with the `tokenizers` binding, truncation, ragged output, threads."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from hypothesis import given
from hypothesis import strategies as st
from numpy.typing import NDArray

from embedpool._native import InputTooLongError, NativeError, Tokenizer

from .conftest import reference

GOLDEN = Path(__file__).parents[1] / "data" / "minilm_golden.json"
SHORT_MAX_LENGTH = 24
texts_strategy = st.lists(st.text(max_size=120), max_size=8)


@pytest.fixture(scope="module")
def short(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(str(tokenizer_path), max_length=SHORT_MAX_LENGTH, pad_to_multiple_of=8)


@pytest.fixture(scope="module")
def short_reference(tokenizer_path: Path) -> tokenizers.Tokenizer:
    return reference(tokenizer_path, SHORT_MAX_LENGTH)


def numpy_padded(rows: list[list[int]], pad_id: int, multiple: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    width = -(-max((len(r) for r in rows), default=0) // multiple) * multiple
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def test_golden_ids_match_sentence_transformers(minilm: Tokenizer) -> None:
    golden = json.loads(GOLDEN.read_text())
    ids, mask, lengths = minilm.encode(golden["texts"])
    assert ids.dtype == mask.dtype == lengths.dtype == np.int64
    assert ids.shape[1] == 256  # one golden text is far over the limit
    for i, expected in enumerate(golden["input_ids"]):
        assert lengths[i] == len(expected)
        assert ids[i, : lengths[i]].tolist() == expected, golden["texts"][i][:80]
        assert (ids[i, lengths[i] :] == minilm.pad_id).all()
    assert (mask.sum(axis=1) == lengths).all()


def test_properties(minilm: Tokenizer) -> None:
    assert (minilm.max_length, minilm.pad_id, minilm.pad_to_multiple_of) == (256, 0, 8)
    assert minilm.max_chars >= minilm.max_length


@given(texts_strategy)
def test_matches_tokenizers_binding(short: Tokenizer, short_reference: tokenizers.Tokenizer, texts: list[str]) -> None:
    expected_rows = [e.ids for e in short_reference.encode_batch(texts)]
    expected_ids, expected_mask = numpy_padded(expected_rows, short.pad_id, 8)
    ids, mask, lengths = short.encode(texts)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_array_equal(lengths, [len(r) for r in expected_rows])
    assert ids.shape[1] <= SHORT_MAX_LENGTH


@given(texts_strategy)
def test_truncation_keeps_cls_and_sep(short: Tokenizer, texts: list[str]) -> None:
    ids, _, lengths = short.encode(texts)
    assert (lengths <= SHORT_MAX_LENGTH).all()
    for row, length in zip(ids, lengths, strict=True):
        assert row[0] == 101
        assert row[length - 1] == 102


@given(texts_strategy)
def test_ragged_agrees_with_padded(short: Tokenizer, texts: list[str]) -> None:
    ids, _, lengths = short.encode(texts)
    flat, offsets = short.encode_ragged(texts)
    assert offsets.shape == (len(texts) + 1,)
    assert offsets[0] == 0
    np.testing.assert_array_equal(np.diff(offsets), lengths)
    assert flat.shape == (offsets[-1],)
    for i, length in enumerate(lengths):
        np.testing.assert_array_equal(flat[offsets[i] : offsets[i + 1]], ids[i, :length])


@given(st.lists(st.text(min_size=300, max_size=400), min_size=4, max_size=10))
def test_small_and_large_calls_agree(short: Tokenizer, short_reference: tokenizers.Tokenizer, texts: list[str]) -> None:
    """A call of one text or under 1 KiB is tokenized on the calling thread (under 256 bytes with the GIL held), a
    larger one over rayon's pool (rust/tokenize.rs `is_small`): the same ids either way. These calls are all over
    1 KiB, and each of their texts is alone."""
    assert sum(len(t.encode()) for t in texts) >= 1024
    flat, offsets = short.encode_ragged(texts)
    expected = [e.ids for e in short_reference.encode_batch(texts)]
    for i, text in enumerate(texts):
        alone, _ = short.encode_ragged([text])
        np.testing.assert_array_equal(flat[offsets[i] : offsets[i + 1]], alone)
        assert alone.tolist() == expected[i]


def test_truncate_false_names_the_offending_index(short: Tokenizer) -> None:
    texts = ["fine", "word " * 100, "also fine"]
    with pytest.raises(InputTooLongError, match=r"\b1\b"):
        short.encode(texts, truncate=False)
    with pytest.raises(InputTooLongError):
        short.encode_ragged(texts, truncate=False)
    # Exactly max_length tokens is not too long.
    exact = " ".join(["word"] * (SHORT_MAX_LENGTH - 2))
    _, _, lengths = short.encode([exact], truncate=False)
    assert lengths.tolist() == [SHORT_MAX_LENGTH]


@given(first=st.integers(0, 60), others=st.sets(st.integers(0, 60), max_size=20))
def test_a_large_call_names_its_first_text_too_long(short: Tokenizer, first: int, others: set[int]) -> None:
    """Split over rayon's threads (a call over 1 KiB), the error still names the first text too long, as a call
    refused again must be refused alike."""
    texts = ["fine"] * 61
    for i in {first} | {i for i in others if i > first}:
        texts[i] = "word " * 100
    for _ in range(3):
        with pytest.raises(InputTooLongError, match=rf"^text {first} "):
            short.encode_ragged(texts, truncate=False)


def test_edge_texts(short: Tokenizer) -> None:
    ids, mask, lengths = short.encode(["", "a\x00b", "\U0001f600" * 3, "\u200b\ufeff"])
    assert ids[0, :2].tolist() == [101, 102]
    assert lengths[0] == 2
    ids, mask, lengths = short.encode([])
    assert ids.shape == mask.shape == (0, 0)
    assert lengths.shape == (0,)


def test_bad_inputs(short: Tokenizer, tokenizer_path: Path) -> None:
    with pytest.raises(NativeError, match="text 1"):
        short.encode(["ok", "\ud800"])
    with pytest.raises(TypeError):
        short.encode("not a list")
    with pytest.raises(TypeError):
        short.encode([1, 2])  # type: ignore[list-item]
    with pytest.raises(NativeError):
        Tokenizer(str(tokenizer_path.with_name("missing.json")), max_length=8)
    with pytest.raises(NativeError):
        Tokenizer(str(tokenizer_path), max_length=2)
    with pytest.raises(NativeError):
        Tokenizer(str(tokenizer_path), max_length=8, pad_to_multiple_of=0)


long_text = st.lists(
    st.one_of(st.sampled_from(["alpha", "beta", "日本", "x" * 30, "\n", "  ", ".", "ünïcödé"]), st.text(max_size=6)),
    min_size=50,
    max_size=400,
).map(" ".join)


@given(long_text)
def test_char_cap_never_changes_tokens(tokenizer_path: Path, text: str) -> None:
    capped = Tokenizer(str(tokenizer_path), max_length=16, max_chars=48)
    expected = reference(tokenizer_path, 16).encode(text).ids
    flat, _ = capped.encode_ragged([text])
    assert flat.tolist() == expected
    too_long = len(reference(tokenizer_path, 10_000).encode(text).ids) > 16
    if too_long:
        with pytest.raises(InputTooLongError):
            capped.encode([text], truncate=False)
    else:
        assert capped.encode([text], truncate=False)[2].tolist() == [len(expected)]


def test_char_cap_falls_back_for_whitespace_heavy_text(tokenizer_path: Path) -> None:
    capped = Tokenizer(str(tokenizer_path), max_length=16, max_chars=48)
    text = "start" + " " * 10_000 + "hello world"
    assert capped.encode_ragged([text])[0].tolist() == reference(tokenizer_path, 16).encode(text).ids


def test_concurrent_threads_agree(minilm: Tokenizer) -> None:
    golden = json.loads(GOLDEN.read_text())
    texts = golden["texts"] * 4
    expected = minilm.encode(texts)

    def run(_: int) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
        return minilm.encode(texts)

    with ThreadPoolExecutor(max_workers=6) as pool:
        for result in pool.map(run, range(24)):
            for got, want in zip(result, expected, strict=True):
                np.testing.assert_array_equal(got, want)
