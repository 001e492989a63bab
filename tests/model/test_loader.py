"""Loading model directories: converted ones as is, raw checkpoints and optimum-style ONNX exports via a cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper

from embedpool.errors import InvalidArgument, NotFound
from embedpool.model import EmbeddingSession, ModelBundle, default_checkpoint, load_config, load_model_dir
from embedpool.model.bert_graph import encoder_from_checkpoint

from .conftest import THREADS, Golden, pad_batch, row_cosines

OPTIMUM_FILES = ("tokenizer.json", "config.json", "1_Pooling/config.json", "sentence_bert_config.json")


def _optimum_like(root: Path, model: onnx.ModelProto) -> Path:
    root.mkdir()
    for name in OPTIMUM_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(default_checkpoint() / name, root / name)
    onnx.save(model, str(root / "model.onnx"))
    return root


def _golden_fp32(bundle: ModelBundle, golden: Golden) -> NDArray[np.float64]:
    session = EmbeddingSession(bundle, "fp32", "cpu", intra_op_threads=THREADS)
    ids, mask = pad_batch(golden.input_ids[:24])
    return row_cosines(session.embed(ids, mask), golden.vectors[:24])


def test_converted_dir_loads_as_is(converted: Path) -> None:
    bundle = load_model_dir(converted)
    assert bundle.root == converted
    assert set(bundle.onnx) == {"fp32", "fp32_opt", "fp16", "int8"}
    assert bundle.tokenizer_path.is_file() and bundle.config.dim == 384


def test_an_older_conversion_does_not_serve_its_batch_dependent_int8(converted: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for item in converted.iterdir():
        (old / item.name).symlink_to(item)
    manifest = json.loads((converted / "embedpool.json").read_text())
    (old / "embedpool.json").unlink()
    (old / "embedpool.json").write_text(json.dumps({**manifest, "converter_version": "2"}))
    assert set(load_model_dir(old).onnx) == {"fp32", "fp32_opt", "fp16"}


def test_raw_checkpoint_needs_a_cache(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cache"):
        load_model_dir(default_checkpoint())
    with pytest.raises(NotFound):
        load_model_dir(tmp_path / "absent", tmp_path)
    with pytest.raises(InvalidArgument, match=r"no embedpool\.json"):
        load_model_dir(tmp_path, tmp_path)


def test_optimum_layout_gets_pooling_appended(tmp_path: Path, golden: Golden) -> None:
    src = default_checkpoint()
    encoder = encoder_from_checkpoint(src / "model.safetensors", load_config(src))
    # optimum's BERT exports take token_type_ids too; the session must feed zeros for it.
    encoder.graph.input.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"]))
    root = _optimum_like(tmp_path / "optimum", encoder)
    bundle = load_model_dir(root, tmp_path / "cache", variants=["fp32"])
    assert bundle.root.parent == tmp_path / "cache" and bundle.config.name == "optimum"
    assert [o.name for o in onnx.load(str(bundle.onnx["fp32"])).graph.output] == ["sentence_embedding"]
    assert _golden_fp32(bundle, golden).min() >= 0.9999


def test_optimum_layout_with_pooled_output_taken_as_is(tmp_path: Path, bundle: ModelBundle, golden: Golden) -> None:
    pooled = onnx.load(str(bundle.onnx["fp32"]))
    pooled.graph.output[0].name = "embeddings"  # as exported, under some other name
    pooled.graph.node[-1].output[0] = "embeddings"
    root = _optimum_like(tmp_path / "pooled", pooled)
    loaded = load_model_dir(root, tmp_path / "cache", variants=["fp32"])
    nodes = onnx.load(str(loaded.onnx["fp32"])).graph.node
    assert len(nodes) == len(pooled.graph.node) + 1  # only the renaming Identity
    assert _golden_fp32(loaded, golden).min() >= 0.9999
