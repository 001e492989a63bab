"""The encoder graph built from safetensors: naming variants, fusion by ORT's optimizer, the attention mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.typing import NDArray

from embedpool.errors import InvalidArgument
from embedpool.model import ModelBundle, fused_operator_statistics, load_config
from embedpool.model.bert_graph import TOKEN_EMBEDDINGS, encoder_from_checkpoint
from embedpool.model.convert import Variant

from .conftest import TINY_CONFIG, TINY_HEADS, TINY_HIDDEN, TINY_VOCAB, pad_batch, tiny_weights, write_checkpoint

# MiniLM-L6: one embedding block; per layer one attention, two residual LayerNorms and one GELU.
EXPECTED_FUSION = {"EmbedLayerNormalization": 1, "Attention": 6, "SkipLayerNormalization": 12, "BiasGelu": 6}


def _tokens(model: onnx.ModelProto, ids: NDArray[np.int64], mask: NDArray[np.int64]) -> NDArray[np.float32]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out: NDArray[np.float32] = session.run([TOKEN_EMBEDDINGS], {"input_ids": ids, "attention_mask": mask})[0]
    return out


def _tiny_batch() -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    rng = np.random.default_rng(1)
    return pad_batch([list(rng.integers(1, TINY_VOCAB, n)) for n in (7, 3, 12)])


@pytest.mark.parametrize("variant", ["bert_prefix", "gamma_beta"])
def test_checkpoint_naming_variants_build_the_same_graph(tmp_path: Path, variant: str) -> None:
    weights = tiny_weights()
    if variant == "bert_prefix":
        renamed = {f"bert.{k}": v for k, v in weights.items()}
    else:
        renamed = {
            k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
            for k, v in weights.items()
        }
    plain = write_checkpoint(tmp_path / "plain", weights, TINY_CONFIG)
    other = write_checkpoint(tmp_path / variant, renamed, TINY_CONFIG)
    ids, mask = _tiny_batch()
    a = _tokens(encoder_from_checkpoint(plain / "model.safetensors", load_config(plain)), ids, mask)
    b = _tokens(encoder_from_checkpoint(other / "model.safetensors", load_config(other)), ids, mask)
    assert a.shape == (3, 12, TINY_HIDDEN)
    np.testing.assert_array_equal(a, b)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    weights = tiny_weights()
    del weights["encoder.layer.1.attention.self.key.bias"]
    root = write_checkpoint(tmp_path, weights, TINY_CONFIG)
    with pytest.raises(InvalidArgument, match=r"encoder\.layer\.1\.attention\.self\.key\.bias"):
        encoder_from_checkpoint(root / "model.safetensors", load_config(root))


def test_unsupported_activation_rejected(tmp_path: Path) -> None:
    root = write_checkpoint(tmp_path, tiny_weights(), {**TINY_CONFIG, "hidden_act": "relu"})
    with pytest.raises(InvalidArgument, match="hidden_act"):
        encoder_from_checkpoint(root / "model.safetensors", load_config(root))


def test_padding_is_masked_out(tmp_path: Path) -> None:
    root = write_checkpoint(tmp_path, tiny_weights(), TINY_CONFIG)
    model = encoder_from_checkpoint(root / "model.safetensors", load_config(root))
    ids, mask = _tiny_batch()
    garbage = np.where(mask == 1, ids, 42)  # a model that ignored the mask would see these ids
    a, b = _tokens(model, ids, mask), _tokens(model, garbage, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(a[real], b[real], atol=1e-6)


def test_tiny_checkpoint_fuses(tmp_path: Path) -> None:
    """A checkpoint shaped unlike MiniLM fuses fully too: the pattern, not the sizes, is what the optimizer matches."""
    from onnxruntime.transformers.optimizer import optimize_model

    root = write_checkpoint(tmp_path, tiny_weights(), TINY_CONFIG)
    onnx.save(encoder_from_checkpoint(root / "model.safetensors", load_config(root)), str(tmp_path / "enc.onnx"))
    stats = optimize_model(
        str(tmp_path / "enc.onnx"), "bert", num_heads=TINY_HEADS, hidden_size=TINY_HIDDEN, opt_level=0
    ).get_fused_operator_statistics()
    assert {k: stats[k] for k in EXPECTED_FUSION} == {
        "EmbedLayerNormalization": 1,
        "Attention": 2,
        "SkipLayerNormalization": 4,
        "BiasGelu": 2,
    }


@pytest.mark.parametrize("variant", ["fp32_opt", "fp16", "int8"])
def test_converted_variants_are_fused(bundle: ModelBundle, variant: Variant) -> None:
    # int8 replaces only the weight MatMuls: the fused fp32 ops stay.
    stats = fused_operator_statistics(bundle.onnx[variant])
    assert {k: stats[k] for k in EXPECTED_FUSION} == EXPECTED_FUSION
