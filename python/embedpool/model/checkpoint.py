"""Read a model directory's JSON configuration (HF config.json plus the sentence-transformers files) into one
frozen `ModelConfig`. Works the same for a raw safetensors checkpoint, an optimum-style ONNX export and a
directory embedpool converted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from embedpool.errors import InvalidArgument

Pooling = Literal["mean", "cls", "max"]

CONFIG_FILE = "config.json"
SBERT_CONFIG_FILE = "sentence_bert_config.json"
POOLING_CONFIG_FILE = "1_Pooling/config.json"
MODULES_FILE = "modules.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "embedpool.json"

# The largest sequence BERT-family checkpoints are trained for; longer inputs fall off the position table.
_MAX_TOKENS_CAP = 512
_NORMALIZE_MODULE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class ModelConfig:
    """What the rest of embedpool needs to know about an embedding model."""

    name: str
    dim: int
    max_tokens: int
    pooling: Pooling
    normalize: bool
    num_layers: int
    num_heads: int
    hidden: int
    intermediate: int
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    model_type: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidArgument(f"model file missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"model file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidArgument(f"model file {path} must hold a JSON object")
    return data


def _optional_json(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def _pooling_mode(pooling_cfg: dict[str, Any] | None, path: Path) -> Pooling:
    if pooling_cfg is None:
        return "mean"
    modes: list[Pooling] = []
    if pooling_cfg.get("pooling_mode_mean_tokens"):
        modes.append("mean")
    if pooling_cfg.get("pooling_mode_cls_token"):
        modes.append("cls")
    if pooling_cfg.get("pooling_mode_max_tokens"):
        modes.append("max")
    unsupported = [
        k
        for k in ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
        if pooling_cfg.get(k)
    ]
    if unsupported or len(modes) != 1:
        raise InvalidArgument(f"{path}: exactly one of mean/cls/max pooling is supported, got {pooling_cfg}")
    return modes[0]


def _normalize(modules: list[Any] | None) -> bool:
    # Without modules.json there is no sentence-transformers pipeline to copy; unit vectors are the service contract.
    if modules is None:
        return True
    return any(isinstance(m, dict) and m.get("type") == _NORMALIZE_MODULE for m in modules)


def _readme_title(root: Path) -> str | None:
    readme = root / "README.md"
    if not readme.is_file():
        return None
    match = re.search(r"^# (\S+)\s*$", readme.read_text(encoding="utf-8", errors="replace"), flags=re.MULTILINE)
    return match.group(1) if match else None


def model_name(root: Path, explicit: str | None = None) -> str:
    """explicit > embedpool.json > the model card's title > the directory name."""
    if explicit:
        return explicit
    manifest = _optional_json(root / MANIFEST_FILE)
    if manifest is not None and isinstance(manifest.get("name"), str):
        return str(manifest["name"])
    return _readme_title(root) or root.resolve().name


def _int(cfg: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidArgument(f"{path}: '{key}' must be a positive integer, got {value!r}")
    return value


def load_config(root: Path, name: str | None = None) -> ModelConfig:
    """Read config.json (+ sentence_bert_config.json, 1_Pooling/config.json, modules.json when present)."""
    cfg_path = root / CONFIG_FILE
    cfg = read_json(cfg_path)
    sbert = _optional_json(root / SBERT_CONFIG_FILE) or {}
    pooling_cfg = _optional_json(root / POOLING_CONFIG_FILE)
    modules_path = root / MODULES_FILE
    modules = json.loads(modules_path.read_text(encoding="utf-8")) if modules_path.is_file() else None

    hidden = _int(cfg, "hidden_size", cfg_path)
    num_heads = _int(cfg, "num_attention_heads", cfg_path)
    if hidden % num_heads:
        raise InvalidArgument(f"{cfg_path}: hidden_size {hidden} is not a multiple of num_attention_heads {num_heads}")
    max_positions = _int(cfg, "max_position_embeddings", cfg_path)
    max_tokens = _int(sbert, "max_seq_length", root / SBERT_CONFIG_FILE, min(_MAX_TOKENS_CAP, max_positions))
    if max_tokens > max_positions:
        raise InvalidArgument(f"{root}: max_seq_length {max_tokens} exceeds max_position_embeddings {max_positions}")
    dim = hidden
    if pooling_cfg is not None:
        dim = _int(pooling_cfg, "word_embedding_dimension", root / POOLING_CONFIG_FILE, hidden)
    return ModelConfig(
        name=model_name(root, name),
        dim=dim,
        max_tokens=max_tokens,
        pooling=_pooling_mode(pooling_cfg, root / POOLING_CONFIG_FILE),
        normalize=_normalize(modules),
        num_layers=_int(cfg, "num_hidden_layers", cfg_path),
        num_heads=num_heads,
        hidden=hidden,
        intermediate=_int(cfg, "intermediate_size", cfg_path, 4 * hidden),
        vocab_size=_int(cfg, "vocab_size", cfg_path),
        max_position_embeddings=max_positions,
        type_vocab_size=_int(cfg, "type_vocab_size", cfg_path, 2),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        hidden_act=str(cfg.get("hidden_act", "gelu")),
        model_type=str(cfg.get("model_type", "bert")),
    )
