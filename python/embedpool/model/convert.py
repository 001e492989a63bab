"""Convert a model directory (a safetensors BERT-family checkpoint, or an optimum-style ONNX export) into an embedpool
model directory: pooled + normalised `model.onnx` and its fused/fp16/int8 variants, the tokenizer and config files,
and an `embedpool.json` manifest. Writes go to a temporary sibling directory renamed into place, so a reader never
sees half a conversion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

import onnx

from embedpool.errors import EmbedpoolError, InvalidArgument
from embedpool.model.bert_graph import encoder_from_checkpoint
from embedpool.model.checkpoint import (
    CONFIG_FILE,
    MANIFEST_FILE,
    MODULES_FILE,
    POOLING_CONFIG_FILE,
    PROMPTS_FILE,
    SBERT_CONFIG_FILE,
    TOKENIZER_FILE,
    ModelConfig,
    load_config,
    read_json,
)
from embedpool.model.families import FAMILIES
from embedpool.model.int8 import quantize_per_token
from embedpool.model.pooling import NODE_PREFIX, append_pooling

# Part of the cache key: bump it whenever a conversion would write different graphs.
CONVERTER_VERSION = "3"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"

Variant = Literal["fp32", "fp32_opt", "fp16", "int8"]
ALL_VARIANTS: tuple[Variant, ...] = ("fp32", "fp32_opt", "fp16", "int8")
VARIANT_FILES: Mapping[Variant, str] = {
    "fp32": ONNX_FILE,  # reference graph: any padding layout
    "fp32_opt": "model_opt.onnx",  # fused for the CPU EP
    "fp16": "model_fp16.onnx",  # fused, float16 weights, for the CUDA EP
    "int8": "model_int8.onnx",  # fused, MatMuls u8 x s8 with per-token activation scales, for the CPU EP
}
_COPIED_FILES = (TOKENIZER_FILE, CONFIG_FILE, POOLING_CONFIG_FILE, SBERT_CONFIG_FILE, MODULES_FILE, PROMPTS_FILE)
_HASHED_FILES = (WEIGHTS_FILE, ONNX_FILE, *_COPIED_FILES)
_log = logging.getLogger(__name__)


class ConversionError(EmbedpoolError, RuntimeError):
    """Converting a model produced something unusable (e.g. the attention fusion did not apply)."""


def source_digest(src: Path) -> str:
    """sha256 over the files a conversion reads: the same checkpoint always maps to the same cache entry."""
    h = hashlib.sha256()
    for name in _HASHED_FILES:
        path = src / name
        if not path.is_file():
            continue
        h.update(name.encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _pooled_graph(src: Path, config: ModelConfig) -> onnx.ModelProto:
    if (src / WEIGHTS_FILE).is_file():
        encoder = encoder_from_checkpoint(src / WEIGHTS_FILE, config)
    elif (src / ONNX_FILE).is_file():
        try:
            encoder = onnx.load(str(src / ONNX_FILE))
        except Exception as exc:  # onnx raises DecodeError, OSError or ValueError depending on the damage
            raise InvalidArgument(f"{src / ONNX_FILE} is not a readable ONNX model: {exc}") from exc
    else:
        raise InvalidArgument(f"{src} holds neither {WEIGHTS_FILE} nor {ONNX_FILE}")
    return append_pooling(encoder, config.pooling, config.normalize, config.dim)


def _fused(model_path: Path, config: ModelConfig, use_gpu: bool) -> Any:
    """Run ORT's transformer optimizer (python fusions only: no session, so no GPU needed to build GPU graphs)."""
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        optimized = optimize_model(
            str(model_path),
            model_type="bert",
            num_heads=config.num_heads,
            hidden_size=config.hidden,
            use_gpu=use_gpu,
            opt_level=0,
        )
    except ImportError as exc:  # its symbolic shape inference needs sympy, an optional dependency of onnxruntime
        raise ConversionError(f"ONNX Runtime's transformer optimizer cannot run: {exc}") from exc
    stats: dict[str, int] = optimized.get_fused_operator_statistics()
    if stats.get("Attention", 0) + stats.get("MultiHeadAttention", 0) == 0:
        raise ConversionError(f"attention fusion failed for {model_path} (fused operators: {stats})")
    return optimized


def fused_operator_statistics(model_path: Path) -> dict[str, int]:
    """Fused-operator counts of an already optimized model file (what the converter checked)."""
    from onnxruntime.transformers.optimizer import get_fusion_statistics

    stats: dict[str, int] = get_fusion_statistics(str(model_path))
    return stats


def _write_fp16(fp32_path: Path, out: Path, config: ModelConfig) -> None:
    optimized = _fused(fp32_path, config, use_gpu=True)
    # Pooling sums up to max_tokens rows: keep it (and the graph output) in fp32.
    pool_nodes = [n.name for n in optimized.model.graph.node if n.name.startswith(NODE_PREFIX)]
    optimized.convert_float_to_float16(keep_io_types=True, node_block_list=pool_nodes)
    optimized.save_model_to_file(str(out))


def _write_fp32_opt(fp32_path: Path, out: Path, config: ModelConfig) -> None:
    _fused(fp32_path, config, use_gpu=False).save_model_to_file(str(out))


def _write_int8(opt_path: Path, out: Path) -> None:
    # Per-token activation scales: a text's vector must not depend on its batch-mates (see model/int8.py).
    # Asymmetric rows: min golden cosine 0.9950 at 1.43x fp32_opt; symmetric ones 0.9923 at 1.55x
    # (bench/quantize.py, one thread).
    onnx.save(quantize_per_token(onnx.load(str(opt_path)), asymmetric=True), str(out))


def _write_manifest(out: Path, config: ModelConfig, src: Path, digest: str, variants: Collection[Variant]) -> None:
    manifest = {
        "name": config.name,
        "architecture": config.model_type,
        "dim": config.dim,
        "max_tokens": config.max_tokens,
        "pooling": config.pooling,
        "normalize": config.normalize,
        "variants": {v: VARIANT_FILES[v] for v in ALL_VARIANTS if v in variants},
        "source": str(src),
        "source_sha256": digest,
        "converter_version": CONVERTER_VERSION,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _convert_into(src: Path, out: Path, config: ModelConfig, digest: str, variants: Collection[Variant]) -> None:
    for name in _COPIED_FILES:
        if (src / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, out / name)
    if not (out / TOKENIZER_FILE).is_file():
        raise InvalidArgument(f"{src} has no {TOKENIZER_FILE}")
    fp32 = out / VARIANT_FILES["fp32"]
    onnx.save(_pooled_graph(src, config), str(fp32))
    if "fp16" in variants:
        _write_fp16(fp32, out / VARIANT_FILES["fp16"], config)
    if "fp32_opt" in variants or "int8" in variants:
        _write_fp32_opt(fp32, out / VARIANT_FILES["fp32_opt"], config)
    if "int8" in variants:
        _write_int8(out / VARIANT_FILES["fp32_opt"], out / VARIANT_FILES["int8"])
    written = {v for v in ALL_VARIANTS if (out / VARIANT_FILES[v]).is_file()}
    _write_manifest(out, config, src, digest, written)


def _buildable(config: ModelConfig, variants: Collection[Variant]) -> Collection[Variant]:
    """The requested variants this architecture allows: the fused ones need ORT's attention fusion, which does
    not recognise MPNet's position-biased attention."""
    family = FAMILIES.get(config.model_type)
    if family is None or family.fuses or set(variants) == {"fp32"}:
        return variants
    _log.warning(
        "%s (%s): ONNX Runtime cannot fuse its attention; converting fp32 only", config.name, config.model_type
    )
    only_fp32: tuple[Variant, ...] = ("fp32",)
    return only_fp32


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def convert_checkpoint(
    src: Path, out: Path, name: str | None = None, variants: Collection[Variant] = ALL_VARIANTS
) -> Path:
    """Convert `src` into the embedpool directory `out` (replacing it atomically) and return `out`."""
    unknown = set(variants) - set(ALL_VARIANTS)
    if "fp32" not in variants or unknown:
        raise InvalidArgument(f"variants must include 'fp32' and only name {ALL_VARIANTS}, got {sorted(variants)}")
    config = load_config(src, name)
    variants = _buildable(config, variants)
    digest = source_digest(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _convert_into(src, tmp, config, digest, variants)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cache_entry(src: Path, cache_root: Path) -> Path:
    return cache_root / f"{source_digest(src)[:32]}-v{CONVERTER_VERSION}"


def is_converted(path: Path) -> bool:
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return False
    variants = read_json(manifest).get("variants", {})
    return isinstance(variants, dict) and all((path / str(f)).is_file() for f in variants.values())


def prepare_model(
    src: Path, cache_root: Path, name: str | None = None, variants: Collection[Variant] = ALL_VARIANTS
) -> Path:
    """The converted directory for `src` under `cache_root`, converting only if that entry is missing."""
    entry = cache_entry(src, cache_root)
    if is_converted(entry):
        return entry
    try:
        return convert_checkpoint(src, entry, name, variants)
    except OSError:
        # Another process may have renamed the same conversion into place first.
        if is_converted(entry):
            return entry
        raise
