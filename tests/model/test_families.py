"""Every architecture x pooling path the converter builds, on tiny random checkpoints written here, against the
numpy reference forward pass; and the checkpoints it must refuse, by name, at conversion.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from embedpool.engine import cpu_has_vnni
from embedpool.errors import InvalidArgument
from embedpool.model import ALL_VARIANTS, EmbeddingSession, ModelBundle, convert_checkpoint, load_model_dir
from embedpool.model.convert import Variant

from .conftest import (
    THREADS,
    TINY_CONFIG,
    TINY_HEADS,
    TINY_HIDDEN,
    TINY_POSITIONS,
    TINY_VOCAB,
    pad_batch,
    row_cosines,
    tiny_weights,
    write_checkpoint,
)
from .numpy_encoder import encode, pool

Weights = dict[str, NDArray[np.float32]]
ARCHS = ("bert", "roberta", "xlm-roberta", "mpnet")
POOLING_FLAGS = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "lasttoken": "pooling_mode_lasttoken",
    "max": "pooling_mode_max_tokens",
}
_CLASSES = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel", "mpnet": "MPNetModel"}
_PREFIXES = {"bert": "bert.", "roberta": "roberta.", "xlm-roberta": "roberta.", "mpnet": "mpnet."}
PAD = 1  # RoBERTa's, XLM-R's and MPNet's padding_idx
# BertModel's names -> MPNetModel's, to write an MPNet checkpoint from the BERT tiny weights.
_TO_MPNET = (
    (".attention.self.query.", ".attention.attn.q."),
    (".attention.self.key.", ".attention.attn.k."),
    (".attention.self.value.", ".attention.attn.v."),
    (".attention.output.dense.", ".attention.attn.o."),
    (".attention.output.LayerNorm.", ".attention.LayerNorm."),
)
# Lengths 1 to 40: every exact relative-position bucket and some logarithmic ones, and a one-token text.
LENGTHS = (7, 3, 40, 1)


def family_checkpoint(arch: str, seed: int = 0) -> tuple[Weights, dict[str, Any]]:
    """Random weights and config.json for `arch`, named as that architecture's HF model class saves them."""
    weights = tiny_weights(seed)
    config: dict[str, Any] = {**TINY_CONFIG, "model_type": arch, "architectures": [_CLASSES[arch]]}
    if arch == "bert":
        return weights, config
    rng = np.random.default_rng(seed + 1)
    rows = TINY_POSITIONS + PAD + 1  # rows 0..PAD are never reached by a real token
    weights["embeddings.position_embeddings.weight"] = (rng.standard_normal((rows, TINY_HIDDEN)) * 0.2).astype(
        np.float32
    )
    config.update(pad_token_id=PAD, max_position_embeddings=rows, type_vocab_size=1)
    if arch != "mpnet":
        weights["embeddings.token_type_embeddings.weight"] = weights["embeddings.token_type_embeddings.weight"][:1]
        return weights, config
    del weights["embeddings.token_type_embeddings.weight"], config["type_vocab_size"]
    for bert_name, mpnet_name in _TO_MPNET:
        weights = {k.replace(bert_name, mpnet_name): v for k, v in weights.items()}
    # A large bias, so that a wrong bucket or a transposed table shows in the vectors.
    weights["encoder.relative_attention_bias.weight"] = rng.standard_normal((32, TINY_HEADS)).astype(np.float32)
    config["relative_attention_num_buckets"] = 32
    return weights, config


def write_family(
    root: Path,
    weights: Weights,
    config: Mapping[str, Any],
    pooling: str = "mean",
    normalize: bool = True,
    extra_files: Mapping[str, Any] | None = None,
) -> Path:
    """A sentence-transformers checkpoint directory: weights, config.json, modules.json, 1_Pooling and extras."""
    write_checkpoint(root, weights, dict(config))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    files: dict[str, Any] = {
        "modules.json": modules,
        "1_Pooling/config.json": {"word_embedding_dimension": TINY_HIDDEN, POOLING_FLAGS.get(pooling, pooling): True},
        **(extra_files or {}),
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content), encoding="utf-8")
    return root


def _batches() -> dict[str, tuple[NDArray[np.int64], NDArray[np.int64]]]:
    rng = np.random.default_rng(7)
    rows = [list(rng.integers(PAD + 2, TINY_VOCAB, n)) for n in LENGTHS]  # no real token uses the pad id
    ids, mask = pad_batch(rows)
    # Left padding: only the fp32 graph takes it; RoBERTa-style positions must still count from the first real token.
    left_ids, left_mask = np.zeros_like(ids), np.zeros_like(mask)
    for i, row in enumerate(rows):
        left_ids[i, ids.shape[1] - len(row) :], left_mask[i, ids.shape[1] - len(row) :] = row, 1
    return {"right": (ids, mask), "left": (left_ids, left_mask)}


BATCHES = _batches()


def _reference(weights: Weights, config: Mapping[str, Any], batch: str, pooling: str, normalize: bool) -> Any:
    ids, mask = BATCHES[batch]
    bare = {k.removeprefix(_PREFIXES[config["model_type"]]): v for k, v in weights.items()}
    return pool(encode(bare, config, ids, mask), mask, pooling, normalize)


def _session(bundle: ModelBundle, variant: Variant) -> EmbeddingSession:
    return EmbeddingSession(bundle, variant, "cpu", intra_op_threads=THREADS)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("pooling", list(POOLING_FLAGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_graph_matches_reference(tmp_path: Path, arch: str, pooling: str, normalize: bool) -> None:
    weights, config = family_checkpoint(arch)
    src = write_family(tmp_path / "src", weights, config, pooling, normalize)
    bundle = load_model_dir(src, tmp_path / "cache", variants=["fp32"])
    assert (bundle.config.model_type, bundle.config.pooling, bundle.config.normalize) == (arch, pooling, normalize)
    session = _session(bundle, "fp32")
    for batch, (ids, mask) in BATCHES.items():
        expected = _reference(weights, config, batch, pooling, normalize)
        np.testing.assert_allclose(session.embed(ids, mask), expected, atol=3e-5, rtol=1e-5, err_msg=batch)


@pytest.mark.parametrize(("arch", "pooling"), [("bert", "max"), ("roberta", "lasttoken"), ("xlm-roberta", "cls")])
def test_fused_variants_match_reference(tmp_path: Path, arch: str, pooling: str) -> None:
    weights, config = family_checkpoint(arch, seed=3)
    bundle = load_model_dir(write_family(tmp_path / "src", weights, config, pooling), tmp_path / "cache")
    assert set(bundle.onnx) == set(ALL_VARIANTS)
    ids, mask = BATCHES["right"]
    expected = _reference(weights, config, "right", pooling, normalize=True)
    np.testing.assert_allclose(_session(bundle, "fp32_opt").embed(ids, mask), expected, atol=3e-5)
    # Reduced precision: close to the reference, not equal to it. int8 only where it is served (a VNNI CPU: without
    # VNNI ORT's u8 x s8 products saturate; tests/model/test_session.py says so when it skips).
    for variant in ("fp16", "int8") if cpu_has_vnni() else ("fp16",):
        assert row_cosines(_session(bundle, variant).embed(ids, mask), expected).min() >= 0.99, variant


def test_mpnet_converts_its_fp32_graph_only(tmp_path: Path) -> None:
    """ORT's optimizer does not fuse attention with a position bias: no fused variant rather than a failed one."""
    weights, config = family_checkpoint("mpnet")
    bundle = load_model_dir(write_family(tmp_path / "src", weights, config), tmp_path / "cache")
    assert set(bundle.onnx) == {"fp32"}
    assert json.loads((bundle.root / "embedpool.json").read_text())["architecture"] == "mpnet"


@pytest.mark.parametrize("arch", ARCHS)
def test_task_head_prefixes_are_stripped(tmp_path: Path, arch: str) -> None:
    weights, config = family_checkpoint(arch)
    prefixed = {_PREFIXES[arch] + k: v for k, v in weights.items()}
    ids, mask = BATCHES["right"]
    out = []
    for name, w in (("plain", weights), ("prefixed", prefixed)):
        bundle = load_model_dir(write_family(tmp_path / name, w, config), tmp_path / "cache", variants=["fp32"])
        out.append(_session(bundle, "fp32").embed(ids, mask))
    np.testing.assert_array_equal(out[0], out[1])


def test_description_is_read_and_exposed(tmp_path: Path) -> None:
    weights, config = family_checkpoint("xlm-roberta")
    prompts = {"query": "query: ", "passage": "passage: "}
    extras = {
        "config_sentence_transformers.json": {"prompts": prompts, "default_prompt_name": "query"},
        "sentence_bert_config.json": {"max_seq_length": 48},
    }
    src = write_family(tmp_path / "src", weights, config, "cls", normalize=False, extra_files=extras)
    described = load_model_dir(src, tmp_path / "cache", variants=["fp32"]).config
    assert (described.model_type, described.architectures) == ("xlm-roberta", ("XLMRobertaModel",))
    assert (described.pooling, described.normalize, described.max_tokens) == ("cls", False, 48)
    assert (dict(described.prompts), described.default_prompt_name, described.include_prompt) == (
        prompts,
        "query",
        True,
    )
    assert described.max_positions == TINY_POSITIONS  # the table's two rows below the first token do not count


def test_mpnet_padding_idx_is_one_whatever_the_config_says(tmp_path: Path) -> None:
    weights, config = family_checkpoint("mpnet")
    config = {**config, "pad_token_id": 0, "max_position_embeddings": TINY_POSITIONS + 2}
    bundle = load_model_dir(write_family(tmp_path / "src", weights, config), tmp_path / "cache", variants=["fp32"])
    assert (bundle.config.padding_idx, bundle.config.max_positions) == (1, TINY_POSITIONS)
    ids, mask = BATCHES["left"]
    expected = pool(encode(weights, config, ids, mask), mask, "mean", True)
    np.testing.assert_allclose(_session(bundle, "fp32").embed(ids, mask), expected, atol=3e-5)


def test_offset_positions_cover_the_whole_table(tmp_path: Path) -> None:
    weights, config = family_checkpoint("roberta")
    bundle = load_model_dir(write_family(tmp_path / "src", weights, config), tmp_path / "cache", variants=["fp32"])
    assert bundle.config.max_tokens == TINY_POSITIONS
    session = _session(bundle, "fp32")
    ids, mask = pad_batch([list(range(PAD + 2, PAD + 2 + TINY_POSITIONS))])
    np.testing.assert_allclose(
        session.embed(ids, mask), pool(encode(weights, config, ids, mask), mask, "mean", True), atol=3e-5
    )
    longer, longer_mask = pad_batch([list(range(PAD + 2, PAD + 3 + TINY_POSITIONS))])
    with pytest.raises(InvalidArgument, match=f"exceeds {TINY_POSITIONS}"):
        session.embed(longer, longer_mask)


def _drop(weights: Weights, key: str) -> Weights:
    return {k: v for k, v in weights.items() if k != key}


def _refused(arch: str, case: str) -> tuple[Weights, dict[str, Any], str, dict[str, Any]]:
    """(weights, config.json, pooling, extra files) of a checkpoint the converter must refuse."""
    weights, config = family_checkpoint(arch)
    if case == "architecture":
        return weights, {**config, "model_type": "distilbert"}, "mean", {}
    if case == "pooling":
        return weights, config, "pooling_mode_weightedmean_tokens", {}
    if case == "module":
        dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            dense,
        ]
        return weights, config, "mean", {"modules.json": modules}
    if case == "position_embedding_type":
        return weights, {**config, "position_embedding_type": "relative_key"}, "mean", {}
    if case == "missing_tensor":
        key = "encoder.relative_attention_bias.weight" if arch == "mpnet" else "embeddings.token_type_embeddings.weight"
        return _drop(weights, key), config, "mean", {}
    if case == "default_prompt_name":
        prompts = {"config_sentence_transformers.json": {"prompts": {"query": "q: "}, "default_prompt_name": "doc"}}
        return weights, config, "mean", prompts
    assert case == "max_seq_length"
    return weights, config, "mean", {"sentence_bert_config.json": {"max_seq_length": TINY_POSITIONS + 1}}


REFUSALS = {
    ("bert", "architecture"): r"unsupported architecture: model_type 'distilbert'",
    ("roberta", "pooling"): r"unsupported pooling \['pooling_mode_weightedmean_tokens'\]",
    ("bert", "module"): r"unsupported sentence-transformers modules \['sentence_transformers\.models\.Dense'\]",
    ("bert", "position_embedding_type"): r"unsupported position_embedding_type 'relative_key'",
    ("mpnet", "missing_tensor"): r"lacks tensor 'encoder\.relative_attention_bias\.weight'",
    ("roberta", "missing_tensor"): r"lacks tensor 'embeddings\.token_type_embeddings\.weight'",
    ("xlm-roberta", "default_prompt_name"): r"default_prompt_name 'doc' is not one of the prompts \['query'\]",
    ("mpnet", "max_seq_length"): rf"max_seq_length {TINY_POSITIONS + 1} exceeds the {TINY_POSITIONS} positions",
}


@pytest.mark.parametrize(("arch", "case"), sorted(REFUSALS))
def test_unsupported_checkpoint_refused_by_name(tmp_path: Path, arch: str, case: str) -> None:
    weights, config, pooling, extras = _refused(arch, case)
    src = write_family(tmp_path / "src", weights, config, pooling, extra_files=extras)
    with pytest.raises(InvalidArgument, match=REFUSALS[arch, case]):
        convert_checkpoint(src, tmp_path / "out", variants=["fp32"])
    assert not (tmp_path / "out").exists()
