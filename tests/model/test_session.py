"""EmbeddingSession against the golden sentence-transformers vectors, in padded mixed-length batches."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from embedpool.engine import cpu_has_vnni
from embedpool.errors import InvalidArgument, NotFound, Unavailable
from embedpool.model import EmbeddingSession, ModelBundle
from embedpool.model.convert import Variant

from .conftest import THREADS, Golden, Sessions, pad_batch, row_cosines

# fp32 graphs reproduce PyTorch to float rounding; int8 (per-token scales) has its worst golden text at 0.9950
# whatever the batch (bench/quantize.py).
MIN_COSINE: dict[Variant, float] = {"fp32": 0.9999, "fp32_opt": 0.9999, "int8": 0.995}
# Without VNNI, ORT's u8 x s8 kernels saturate (vpmaddubsw): int8's fidelity is a VNNI CPU's, and `auto` serves
# int8 only there (tests/test_engine.py); the server warns when int8 is asked for elsewhere.
_NO_VNNI = "this CPU has no VNNI: int8's fidelity bound holds where auto serves int8 (a VNNI CPU), not here"


@pytest.mark.parametrize("variant", sorted(MIN_COSINE))
def test_golden_in_padded_batches(sessions: Sessions, golden: Golden, variant: Variant) -> None:
    if variant == "int8" and not cpu_has_vnni():
        pytest.skip(_NO_VNNI)
    session = sessions(variant)
    n = len(golden.input_ids)
    batched = np.concatenate([session.embed(*pad_batch(golden.input_ids[i : i + 8])) for i in range(0, n, 8)])
    everything = session.embed(*pad_batch(golden.input_ids))
    for out in (batched, everything):
        assert out.shape == (n, 384) and out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
        cos = row_cosines(out, golden.vectors)
        assert cos.min() >= MIN_COSINE[variant], f"worst row {cos.argmin()}: {golden.texts[cos.argmin()]!r}"


@pytest.mark.parametrize("variant", ["fp32", "fp32_opt", "int8"])
def test_batch_composition_does_not_matter(sessions: Sessions, golden: Golden, variant: Variant) -> None:
    session = sessions(variant)
    rows = [golden.input_ids[i] for i in (49, 0, 56, 50, 7)]  # short, medium, 256 tokens, one word, ...
    together = session.embed(*pad_batch(rows, width=260))
    for i, row in enumerate(rows):
        alone = session.embed(*pad_batch([row]))
        np.testing.assert_allclose(together[i], alone[0], atol=2e-5)


def test_properties(sessions: Sessions) -> None:
    session = sessions("int8")
    assert (session.variant, session.provider, session.dim) == ("int8", "CPUExecutionProvider", 384)


def test_auto_on_cpu_picks_exact_fused_fp32(bundle: ModelBundle) -> None:
    assert EmbeddingSession(bundle, "auto", "cpu", intra_op_threads=THREADS).variant == "fp32_opt"


def test_fused_variants_reject_left_padding(sessions: Sessions) -> None:
    ids = np.array([[0, 101, 7592, 102]], dtype=np.int64)
    mask = np.array([[0, 1, 1, 1]], dtype=np.int64)
    with pytest.raises(InvalidArgument, match="right-padded"):
        sessions("int8").embed(ids, mask)
    assert sessions("fp32").embed(ids, mask).shape == (1, 384)  # the reference graph takes any mask


@pytest.mark.parametrize(
    ("ids_shape", "mask_shape", "match"),
    [((2, 4), (2, 5), "must be equal"), ((0, 4), (0, 4), "non-empty"), ((1, 513), (1, 513), "exceeds")],
)
def test_bad_shapes(sessions: Sessions, ids_shape: tuple[int, int], mask_shape: tuple[int, int], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        sessions("fp32").embed(np.ones(ids_shape, dtype=np.int64), np.ones(mask_shape, dtype=np.int64))


def test_missing_variant(bundle: ModelBundle) -> None:
    partial = ModelBundle(bundle.root, {"fp32": bundle.onnx["fp32"]}, bundle.tokenizer_path, bundle.config)
    with pytest.raises(NotFound, match="int8"):
        EmbeddingSession(partial, "int8")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="checks the CPU-only fallback")
def test_cuda_fallback_to_cpu_is_refused(bundle: ModelBundle) -> None:
    with pytest.raises(Unavailable, match="CUDAExecutionProvider"):
        EmbeddingSession(bundle, "auto", "cuda")
