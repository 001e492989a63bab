"""The pooling + normalise surgery against a numpy model of sentence-transformers' Pooling and Normalize."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.typing import NDArray
from onnx import TensorProto, helper

from embedpool.model import SENTENCE_EMBEDDING, append_pooling
from embedpool.model.checkpoint import Pooling

HIDDEN = 8
Run = Callable[[NDArray[np.float32], NDArray[np.int64]], NDArray[np.float32]]


def _token_graph(opset: int) -> onnx.ModelProto:
    """Stands in for an encoder: its token embeddings are an input, passed through."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["tokens"], ["last_hidden_state"])],
        "tokens",
        inputs=[
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        outputs=[helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _reference(tokens: NDArray[np.float32], mask: NDArray[np.int64], mode: Pooling) -> NDArray[np.float64]:
    t, m = tokens.astype(np.float64), mask.astype(np.float64)[..., None]
    if mode == "cls":
        pooled = t[:, 0]
    elif mode == "max":
        pooled = np.where(m > 0, t, -1e9).max(1)
    elif mode == "lasttoken":  # the batches are right-padded and never empty
        pooled = t[np.arange(len(t)), mask.sum(1) - 1]
    else:
        pooled = (t * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return np.asarray(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))


def _runner(mode: Pooling, opset: int) -> Run:
    model = append_pooling(_token_graph(opset), mode, normalize=True, dim=HIDDEN)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [SENTENCE_EMBEDDING]

    def run(tokens: NDArray[np.float32], mask: NDArray[np.int64]) -> NDArray[np.float32]:
        out: NDArray[np.float32] = session.run(None, {"tokens": tokens, "attention_mask": mask})[0]
        return out

    return run


RUNNERS = {
    (mode, opset): _runner(mode, opset) for mode in ("mean", "cls", "max", "lasttoken") for opset in (11, 17, 18)
}


@st.composite
def batches(draw: st.DrawFn) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    lengths = draw(st.lists(st.integers(1, 9), min_size=1, max_size=5))
    seq = max(lengths) + draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    tokens = (np.random.default_rng(seed).standard_normal((len(lengths), seq, HIDDEN)) * 3).astype(np.float32)
    mask = (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return tokens, mask


@pytest.mark.parametrize(("mode", "opset"), sorted(RUNNERS))
@given(batch=batches())
def test_pooling_matches_reference(
    mode: Pooling, opset: int, batch: tuple[NDArray[np.float32], NDArray[np.int64]]
) -> None:
    tokens, mask = batch
    out = RUNNERS[mode, opset](tokens, mask)
    assert out.dtype == np.float32 and out.shape == (tokens.shape[0], HIDDEN)
    np.testing.assert_allclose(out, _reference(tokens, mask, mode), atol=2e-6)


def test_padding_values_do_not_leak() -> None:
    tokens = np.ones((1, 4, HIDDEN), dtype=np.float32)
    tokens[0, 2:] = 1e6  # padded positions hold garbage
    mask = np.array([[1, 1, 0, 0]], dtype=np.int64)
    for mode in ("mean", "max"):
        np.testing.assert_allclose(RUNNERS[mode, 17](tokens, mask), np.full((1, HIDDEN), HIDDEN**-0.5), rtol=1e-6)


def test_already_pooled_output_taken_as_is() -> None:
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["tokens"], ["pooler_output"], axes=[1], keepdims=0)],
        "pooled",
        inputs=[
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        outputs=[helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch", HIDDEN])],
    )
    model = append_pooling(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "mean", True, HIDDEN)
    assert [n.op_type for n in model.graph.node] == ["ReduceMean", "Identity"]
    assert [o.name for o in model.graph.output] == [SENTENCE_EMBEDDING]
