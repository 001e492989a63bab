"""topk_cosine against numpy: ordering, ties, shapes and rejected inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

from embedpool._native import NativeError, topk_cosine


def numpy_cosine(queries: NDArray[np.float32], corpus: NDArray[np.floating]) -> NDArray[np.float64]:
    q = queries.astype(np.float64)
    c = corpus.astype(np.float64)
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    cn = np.linalg.norm(c, axis=1, keepdims=True)
    return (q / np.where(qn == 0, 1, qn)) @ (c / np.where(cn == 0, 1, cn)).T


def check_against_numpy(queries: NDArray[np.float32], corpus: NDArray[np.floating], k: int) -> None:
    indices, scores = topk_cosine(queries, corpus, k)
    expected = numpy_cosine(queries, corpus)
    kept = min(k, corpus.shape[0])
    assert indices.shape == scores.shape == (queries.shape[0], kept)
    assert indices.dtype == np.int64
    assert scores.dtype == np.float32
    for q in range(queries.shape[0]):
        # Reference order: score descending, then index ascending (a stable sort on -score).
        ref = np.argsort(-expected[q], kind="stable")[:kept]
        np.testing.assert_allclose(scores[q], expected[q, ref], atol=1e-5)
        np.testing.assert_allclose(expected[q, indices[q]], expected[q, ref], atol=1e-5)
        assert len(set(indices[q].tolist())) == kept
        assert (np.diff(scores[q]) <= 0).all()
        # Exact ties (as computed) are broken by the lower index.
        ties = scores[q, 1:] == scores[q, :-1]
        assert (indices[q, 1:][ties] > indices[q, :-1][ties]).all()


small_floats = st.floats(-4, 4, width=32).map(lambda v: round(v, 1))


@given(
    st.integers(1, 5).flatmap(
        lambda dim: st.tuples(
            hnp.arrays(np.float32, st.tuples(st.integers(0, 6), st.just(dim)), elements=small_floats),
            hnp.arrays(np.float32, st.tuples(st.integers(0, 60), st.just(dim)), elements=small_floats),
        )
    ),
    st.integers(1, 70),
)
def test_matches_numpy_with_ties(arrays: tuple[NDArray[np.float32], NDArray[np.float32]], k: int) -> None:
    # Few distinct rounded values give many duplicate rows, zero vectors and exact ties.
    queries, corpus = arrays
    check_against_numpy(queries, corpus, k)


def test_duplicate_rows_tie_by_index() -> None:
    corpus = np.tile(np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32), (4, 1))
    indices, scores = topk_cosine(np.array([[1, 0]], dtype=np.float32), corpus, 6)
    assert indices.tolist() == [[0, 3, 6, 9, 2, 5]]
    assert scores[0, :4].tolist() == [1.0] * 4


def test_realistic_sizes_and_float16() -> None:
    rng = np.random.default_rng(7)
    corpus = rng.standard_normal((5000, 384), dtype=np.float32)
    queries = rng.standard_normal((19, 384), dtype=np.float32)
    check_against_numpy(queries, corpus, 10)
    half = corpus.astype(np.float16)
    check_against_numpy(queries, half, 10)
    # Strided inputs are accepted too.
    check_against_numpy(queries[::2], corpus[::3], 5)


def test_k_larger_than_corpus_and_empty_corpus() -> None:
    queries = np.ones((2, 3), dtype=np.float32)
    indices, _ = topk_cosine(queries, np.eye(3, dtype=np.float32), 10)
    assert indices.shape == (2, 3)
    indices, scores = topk_cosine(queries, np.empty((0, 3), dtype=np.float32), 4)
    assert indices.shape == scores.shape == (2, 0)


def test_zero_vectors_score_zero() -> None:
    corpus = np.array([[0, 0], [1, 0], [-1, 0]], dtype=np.float32)
    indices, scores = topk_cosine(np.array([[1, 0], [0, 0]], dtype=np.float32), corpus, 3)
    assert indices.tolist() == [[1, 0, 2], [0, 1, 2]]
    assert scores.tolist() == [[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]
    assert not np.isnan(scores).any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected(bad: float) -> None:
    good = np.ones((2, 4), dtype=np.float32)
    poisoned = good.copy()
    poisoned[1, 2] = bad
    with pytest.raises(NativeError, match="row 1"):
        topk_cosine(good, poisoned, 1)
    with pytest.raises(NativeError, match="row 1"):
        topk_cosine(poisoned, good, 1)
    with pytest.raises(NativeError):
        topk_cosine(good, poisoned.astype(np.float16), 1)


def test_bad_shapes_and_arguments() -> None:
    q = np.ones((1, 4), dtype=np.float32)
    with pytest.raises(NativeError, match="dimension"):
        topk_cosine(q, np.ones((3, 5), dtype=np.float32), 1)
    with pytest.raises(NativeError, match="2-D"):
        topk_cosine(q, np.ones(4, dtype=np.float32), 1)
    with pytest.raises(NativeError, match="2-D"):
        topk_cosine(np.ones(4, dtype=np.float32), q, 1)
    for k in (0, -1):
        with pytest.raises(NativeError):
            topk_cosine(q, q, k)
    with pytest.raises(NativeError, match="float32"):
        topk_cosine(q.astype(np.float64), q, 1)
    with pytest.raises(NativeError):
        topk_cosine(q, q.astype(np.float64), 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_ties_across_parallel_chunks_prefer_lower_index(dtype: type[np.floating]) -> None:
    # Large enough that the corpus is split into several chunks scored on different threads.
    corpus = np.tile(np.array([[1, 0, 0], [0, 1, 0], [2, 0, 0]], dtype=dtype), (20_000, 1))
    indices, scores = topk_cosine(np.array([[3, 0, 0], [0, 0, 1]], dtype=np.float32), corpus, 5)
    assert indices[0].tolist() == [0, 2, 3, 5, 6]
    assert scores[0].tolist() == [1.0] * 5
    assert indices[1].tolist() == [0, 1, 2, 3, 4]


def test_large_corpus_with_dimension_tail_matches_numpy() -> None:
    rng = np.random.default_rng(11)
    corpus = rng.standard_normal((9000, 37), dtype=np.float32) * rng.uniform(0.1, 10, (9000, 1)).astype(np.float32)
    corpus[123] = 0
    check_against_numpy(rng.standard_normal((11, 37), dtype=np.float32), corpus, 7)
