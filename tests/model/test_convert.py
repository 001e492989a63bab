"""Converting the default checkpoint: files, manifest, the fp16 variant, idempotence, broken checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from embedpool.errors import InvalidArgument
from embedpool.model import CONVERTER_VERSION, ModelBundle, convert_checkpoint, default_checkpoint, prepare_model
from embedpool.model.convert import source_digest

from .conftest import Golden, Sessions, pad_batch, row_cosines

CONFIG_FILES = ("tokenizer.json", "config.json", "1_Pooling/config.json", "sentence_bert_config.json")


def test_manifest_and_files(converted: Path) -> None:
    manifest = json.loads((converted / "embedpool.json").read_text())
    assert manifest["name"] == "all-MiniLM-L6-v2"
    assert (manifest["dim"], manifest["max_tokens"], manifest["converter_version"]) == (384, 256, CONVERTER_VERSION)
    assert manifest["source_sha256"] == source_digest(default_checkpoint())
    assert manifest["variants"] == {
        "fp32": "model.onnx",
        "fp32_opt": "model_opt.onnx",
        "fp16": "model_fp16.onnx",
        "int8": "model_int8.onnx",
    }
    for name in CONFIG_FILES:
        assert (converted / name).read_bytes() == (default_checkpoint() / name).read_bytes()
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_fp32_graph_io(bundle: ModelBundle) -> None:
    model = onnx.load(str(bundle.onnx["fp32"]))
    onnx.checker.check_model(model)
    io = [(v.name, v.type.tensor_type.elem_type) for v in (*model.graph.input, *model.graph.output)]
    assert io == [
        ("input_ids", onnx.TensorProto.INT64),
        ("attention_mask", onnx.TensorProto.INT64),
        ("sentence_embedding", onnx.TensorProto.FLOAT),
    ]


def test_fp16_variant_is_half_precision_with_fp32_io(bundle: ModelBundle) -> None:
    model = onnx.load(str(bundle.onnx["fp16"]))
    weights = [t for t in model.graph.initializer if t.name.endswith("_qkv_weight")]
    assert len(weights) == 6 and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.INT64] * 2
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_fp16_runs_on_cpu_when_supported(sessions: Sessions, golden: Golden) -> None:
    # fp16 targets the CUDA EP; this ORT build's CPU kernels happen to cover it, which lets CI check its numbers.
    ids, mask = pad_batch(golden.input_ids[:16])
    out = sessions("fp16").embed(ids, mask)
    assert row_cosines(out, golden.vectors[:16]).min() >= 0.999


def test_prepare_is_idempotent(converted: Path, model_cache: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in converted.rglob("*")}
    assert prepare_model(default_checkpoint(), model_cache) == converted
    assert {p: p.stat().st_mtime_ns for p in converted.rglob("*")} == before


def _copy_configs(src: Path, dst: Path) -> Path:
    for name in CONFIG_FILES:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dst / name)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_broken_checkpoint_raises_clearly(tmp_path: Path, damage: str) -> None:
    src = _copy_configs(default_checkpoint(), tmp_path / "src")
    weights = (default_checkpoint() / "model.safetensors").read_bytes()
    if damage == "truncated":
        (src / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    elif damage == "garbage":
        (src / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InvalidArgument, match="truncated or not a safetensors" if damage != "missing" else "neither"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_int8_variant_quantizes_every_weight_matmul_per_token(bundle: ModelBundle) -> None:
    # Per-token scales (blocked QuantizeLinear) keep a text's vector independent of its batch; u8 x s8 takes ORT's
    # VNNI kernels. No per-tensor dynamic quantization may remain: it couples the rows of a batch.
    model = onnx.load(str(bundle.onnx["int8"]))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 18 and ops.count("Attention") == 6 and "MatMul" not in ops
    assert not {"DynamicQuantizeLinear", "QAttention", "DynamicQuantizeMatMul"} & set(ops)
    blocks = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(blocks) == 18 and all({a.name for a in n.attribute} == {"axis", "block_size"} for n in blocks)
    weights = {t.name: t for t in model.graph.initializer}
    gemm_weights = [weights[n.input[1]] for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert all(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2 for t in gemm_weights)
