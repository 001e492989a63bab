"""ModelConfig from the JSON files of a checkpoint directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from embedpool.errors import InvalidArgument
from embedpool.model import default_checkpoint, load_config


def _config_only(tmp_path: Path) -> Path:
    shutil.copyfile(default_checkpoint() / "config.json", tmp_path / "config.json")
    return tmp_path


def test_default_checkpoint_config() -> None:
    cfg = load_config(default_checkpoint())
    assert (cfg.name, cfg.dim, cfg.max_tokens, cfg.pooling, cfg.normalize) == (
        "all-MiniLM-L6-v2",
        384,
        256,
        "mean",
        True,
    )
    assert (cfg.num_layers, cfg.num_heads, cfg.hidden, cfg.head_dim, cfg.intermediate) == (6, 12, 384, 32, 1536)
    assert (cfg.model_type, cfg.architectures, cfg.padding_idx, cfg.max_positions) == ("bert", ("BertModel",), 0, 512)
    assert (dict(cfg.prompts), cfg.default_prompt_name, cfg.include_prompt) == ({}, None, True)


def test_bare_hf_config_defaults(tmp_path: Path) -> None:
    cfg = load_config(_config_only(tmp_path), name="bare")
    assert (cfg.name, cfg.max_tokens, cfg.pooling, cfg.normalize) == ("bare", 512, "mean", True)


@pytest.mark.parametrize(
    ("flag", "mode"),
    [("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"), ("pooling_mode_lasttoken", "lasttoken")],
)
def test_pooling_modes(tmp_path: Path, flag: str, mode: str) -> None:
    root = _config_only(tmp_path)
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling/config.json").write_text(json.dumps({"word_embedding_dimension": 384, flag: True}))
    assert load_config(root).pooling == mode


def test_ambiguous_pooling_rejected(tmp_path: Path) -> None:
    root = _config_only(tmp_path)
    (root / "1_Pooling").mkdir()
    both = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}
    (root / "1_Pooling/config.json").write_text(json.dumps(both))
    with pytest.raises(InvalidArgument, match="exactly one"):
        load_config(root)


def test_max_seq_length_beyond_positions_rejected(tmp_path: Path) -> None:
    root = _config_only(tmp_path)
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 1024}))
    with pytest.raises(InvalidArgument, match="max_position_embeddings"):
        load_config(root)


def test_missing_or_broken_config(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="missing"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        load_config(tmp_path)
