"""Model fixtures: the default checkpoint converted once per session, sessions per variant, the golden reference
(sentence-transformers fp32 on CPU), and a tiny random BERT checkpoint for cheap structural tests.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from safetensors.numpy import save_file

from embedpool.model import EmbeddingSession, ModelBundle, default_checkpoint, load_model_dir, prepare_model
from embedpool.model.convert import Variant

DATA = Path(__file__).resolve().parents[1] / "data"
THREADS = 2

Padded = tuple[NDArray[np.int64], NDArray[np.int64]]
Sessions = Callable[[Variant], EmbeddingSession]


@dataclass(frozen=True)
class Golden:
    texts: list[str]
    input_ids: list[list[int]]
    vectors: NDArray[np.float32]

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints fixtures along with a failing example: 57 texts and vectors would bury it."""
        printer.text(f"Golden({len(self.texts)} texts)")


def pad_batch(rows: Sequence[Sequence[int]], width: int | None = None) -> Padded:
    """Right-pad to the longest row (or `width`), as the pool's batcher does."""
    width = width or max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def row_cosines(a: NDArray[np.float32], b: NDArray[np.float32]) -> NDArray[np.float64]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.asarray((a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)))


@pytest.fixture(scope="session")
def golden() -> Golden:
    data = json.loads((DATA / "minilm_golden.json").read_text(encoding="utf-8"))
    return Golden(data["texts"], data["input_ids"], np.load(DATA / "minilm_golden.npy"))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model_cache")


@pytest.fixture(scope="session")
def converted(model_cache: Path) -> Path:
    return prepare_model(default_checkpoint(), model_cache)


@pytest.fixture(scope="session")
def bundle(converted: Path) -> ModelBundle:
    return load_model_dir(converted)


@pytest.fixture(scope="session")
def sessions(bundle: ModelBundle) -> Sessions:
    cache: dict[Variant, EmbeddingSession] = {}

    def get(variant: Variant) -> EmbeddingSession:
        if variant not in cache:
            cache[variant] = EmbeddingSession(bundle, variant, "cpu", intra_op_threads=THREADS)
        return cache[variant]

    return get


TINY_HIDDEN, TINY_FFN, TINY_HEADS, TINY_LAYERS, TINY_VOCAB, TINY_POSITIONS = 32, 64, 4, 2, 100, 64
TINY_CONFIG: dict[str, object] = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "hidden_act": "gelu",
    "hidden_size": TINY_HIDDEN,
    "intermediate_size": TINY_FFN,
    "num_attention_heads": TINY_HEADS,
    "num_hidden_layers": TINY_LAYERS,
    "max_position_embeddings": TINY_POSITIONS,
    "type_vocab_size": 2,
    "vocab_size": TINY_VOCAB,
    "layer_norm_eps": 1e-12,
}


def tiny_weights(
    seed: int = 0, *, vocab: int = TINY_VOCAB, positions: int = TINY_POSITIONS
) -> dict[str, NDArray[np.float32]]:
    """Random BERT weights in the canonical naming, sized by TINY_CONFIG (or a larger vocabulary and position
    table, e.g. a real tokenizer's, for a model a server can run on real text)."""
    rng = np.random.default_rng(seed)
    h, f = TINY_HIDDEN, TINY_FFN

    def t(*shape: int) -> NDArray[np.float32]:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": t(vocab, h),
        "embeddings.position_embeddings.weight": t(positions, h),
        "embeddings.token_type_embeddings.weight": t(2, h),
        "embeddings.LayerNorm.weight": 1 + t(h),
        "embeddings.LayerNorm.bias": t(h),
    }
    for i in range(TINY_LAYERS):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            w[f"{p}.attention.self.{name}.weight"], w[f"{p}.attention.self.{name}.bias"] = t(h, h), t(h)
        w[f"{p}.attention.output.dense.weight"], w[f"{p}.attention.output.dense.bias"] = t(h, h), t(h)
        w[f"{p}.attention.output.LayerNorm.weight"], w[f"{p}.attention.output.LayerNorm.bias"] = 1 + t(h), t(h)
        w[f"{p}.intermediate.dense.weight"], w[f"{p}.intermediate.dense.bias"] = t(f, h), t(f)
        w[f"{p}.output.dense.weight"], w[f"{p}.output.dense.bias"] = t(h, f), t(h)
        w[f"{p}.output.LayerNorm.weight"], w[f"{p}.output.LayerNorm.bias"] = 1 + t(h), t(h)
    return w


def write_checkpoint(root: Path, weights: dict[str, NDArray[np.float32]], config: dict[str, object]) -> Path:
    """A raw checkpoint directory: weights, config.json and the default model's tokenizer (never run here)."""
    root.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(config), encoding="utf-8")
    shutil.copyfile(default_checkpoint() / "tokenizer.json", root / "tokenizer.json")
    return root
