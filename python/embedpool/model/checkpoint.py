"""Read a model directory's JSON configuration (HF config.json plus the sentence-transformers files: modules,
pooling, max_seq_length, prompts) into one frozen `ModelConfig`. Works the same for a raw safetensors checkpoint, an
optimum-style ONNX export and a directory embedpool converted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from embedpool.errors import InvalidArgument
from embedpool.model.families import FAMILIES

Pooling = Literal["mean", "cls", "max", "lasttoken"]

CONFIG_FILE = "config.json"
SBERT_CONFIG_FILE = "sentence_bert_config.json"
POOLING_CONFIG_FILE = "1_Pooling/config.json"
MODULES_FILE = "modules.json"
PROMPTS_FILE = "config_sentence_transformers.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "embedpool.json"

# The largest sequence BERT-family checkpoints are trained for; longer inputs fall off the position table.
_MAX_TOKENS_CAP = 512
_MODULES = "sentence_transformers.models."
_NORMALIZE_MODULE = _MODULES + "Normalize"
# A module past these (Dense, a second LayerNorm, ...) changes the vectors: skipping it would serve them wrong.
_KNOWN_MODULES = frozenset(_MODULES + m for m in ("Transformer", "Pooling", "Normalize"))
# Pooling flags in 1_Pooling/config.json: the one set is the mode; the others' names serve the error message.
_POOLING_FLAGS: dict[str, Pooling | None] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_mean_sqrt_len_tokens": None,
    "pooling_mode_weightedmean_tokens": None,
}


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
    architectures: tuple[str, ...] = ()
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    # Pooling over the prompt's tokens too (sentence-transformers' include_prompt); prompts are the server's to apply.
    include_prompt: bool = True
    prompts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    default_prompt_name: str | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def padding_idx(self) -> int:
        return padding_idx(self.model_type, self.pad_token_id)

    @property
    def position_offset(self) -> int:
        return position_offset(self.model_type, self.pad_token_id)

    @property
    def max_positions(self) -> int:
        """The longest sequence the position table covers."""
        return self.max_position_embeddings - self.position_offset


def padding_idx(model_type: str, pad_token_id: int) -> int:
    family = FAMILIES.get(model_type)
    return family.padding_idx if family is not None and family.padding_idx is not None else pad_token_id


def position_offset(model_type: str, pad_token_id: int) -> int:
    """Rows of the position table below the first token's (RoBERTa-style models start at padding_idx + 1)."""
    family = FAMILIES.get(model_type)
    return padding_idx(model_type, pad_token_id) + 1 if family is not None and family.offset_positions else 0


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
    chosen = [flag for flag in _POOLING_FLAGS if pooling_cfg.get(flag)]
    modes = [_POOLING_FLAGS[flag] for flag in chosen]
    if len(modes) != 1 or modes[0] is None:
        supported = [flag for flag, mode in _POOLING_FLAGS.items() if mode is not None]
        raise InvalidArgument(f"{path}: unsupported pooling {chosen or 'none'}; exactly one of {supported} must be set")
    return modes[0]


def _modules(path: Path) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"model file {path} is not valid JSON: {exc}") from exc
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise InvalidArgument(f"model file {path} must hold a JSON list of modules")
    unsupported = [m.get("type") for m in modules if m.get("type") not in _KNOWN_MODULES]
    if unsupported:
        raise InvalidArgument(
            f"{path}: unsupported sentence-transformers modules {unsupported} (only Transformer,"
            " Pooling and Normalize are built into the graph)"
        )
    pooling_paths = [m.get("path") for m in modules if m.get("type") == _MODULES + "Pooling"]
    if pooling_paths not in ([], [POOLING_CONFIG_FILE.split("/")[0]]):
        raise InvalidArgument(f"{path}: a Pooling module must live in 1_Pooling, found {pooling_paths}")
    return modules


def _normalize(modules: list[dict[str, Any]] | None) -> bool:
    # Without modules.json there is no sentence-transformers pipeline to copy; unit vectors are the service contract.
    if modules is None:
        return True
    return any(m.get("type") == _NORMALIZE_MODULE for m in modules)


def _prompts(st_cfg: dict[str, Any], path: Path) -> tuple[Mapping[str, str], str | None]:
    prompts = st_cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise InvalidArgument(f"{path}: 'prompts' must map prompt names to strings, got {prompts!r}")
    default = st_cfg.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise InvalidArgument(f"{path}: default_prompt_name {default!r} is not one of the prompts {sorted(prompts)}")
    return MappingProxyType(dict(prompts)), default


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
    """Read config.json (+ sentence_bert_config.json, 1_Pooling/config.json, modules.json and
    config_sentence_transformers.json when present)."""
    cfg_path = root / CONFIG_FILE
    cfg = read_json(cfg_path)
    sbert = _optional_json(root / SBERT_CONFIG_FILE) or {}
    pooling_cfg = _optional_json(root / POOLING_CONFIG_FILE)
    modules = _modules(root / MODULES_FILE)
    prompts, default_prompt = _prompts(_optional_json(root / PROMPTS_FILE) or {}, root / PROMPTS_FILE)

    hidden = _int(cfg, "hidden_size", cfg_path)
    num_heads = _int(cfg, "num_attention_heads", cfg_path)
    if hidden % num_heads:
        raise InvalidArgument(f"{cfg_path}: hidden_size {hidden} is not a multiple of num_attention_heads {num_heads}")
    pad_token_id = cfg.get("pad_token_id") or 0
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or pad_token_id < 0:
        raise InvalidArgument(f"{cfg_path}: 'pad_token_id' must be a non-negative integer, got {pad_token_id!r}")
    model_type = str(cfg.get("model_type", "bert"))
    max_position_embeddings = _int(cfg, "max_position_embeddings", cfg_path)
    max_positions = max_position_embeddings - position_offset(model_type, pad_token_id)
    max_tokens = _int(sbert, "max_seq_length", root / SBERT_CONFIG_FILE, min(_MAX_TOKENS_CAP, max_positions))
    if max_tokens > max_positions:
        raise InvalidArgument(
            f"{root}: max_seq_length {max_tokens} exceeds the {max_positions} positions"
            f" max_position_embeddings {max_position_embeddings} gives this {model_type} model"
        )
    dim = hidden
    if pooling_cfg is not None:
        dim = _int(pooling_cfg, "word_embedding_dimension", root / POOLING_CONFIG_FILE, hidden)
    architectures = cfg.get("architectures") or []
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
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=_int(cfg, "type_vocab_size", cfg_path, 2),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        hidden_act=str(cfg.get("hidden_act", "gelu")),
        model_type=model_type,
        architectures=tuple(str(a) for a in architectures) if isinstance(architectures, list) else (),
        pad_token_id=pad_token_id,
        position_embedding_type=str(cfg.get("position_embedding_type", "absolute")),
        include_prompt=bool((pooling_cfg or {}).get("include_prompt", True)),
        prompts=prompts,
        default_prompt_name=default_prompt,
    )
