"""The model on this machine that a run tokenizes with and runs its engine baseline on: `--model DIR`, else the
model a local `embedpool serve` would load (EMBEDPOOL_MODEL, else the bundled all-MiniLM-L6-v2)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from embedpool import _native, config
from embedpool.engine import model_source, prepare
from embedpool.errors import EmbedpoolError
from embedpool.model import ModelBundle

__all__ = ["TokenCounter", "checkpoint_path", "find_model", "try_counter"]

# Counting needs no cut-off: a text's count is what the model would see, up to the model's own limit (applied by
# `TokenCounter.count`); a huge max_length keeps a count monotone in the text while texts are being built.
_UNCAPPED = 1 << 24


def _settings(model_dir: str) -> config.Settings:
    """This machine's server settings (EMBEDPOOL_* variables), with `model_dir` as the model when given."""
    settings = config.load()
    return dataclasses.replace(settings, model=model_dir) if model_dir else settings


def find_model(model_dir: str) -> ModelBundle:
    """The bundle of `model_dir` (a converted dir, an ONNX export or a safetensors checkpoint, converted into the
    data dir's cache as the server does), or of the model `embedpool serve` would load here. EmbedpoolError when
    there is none."""
    return prepare(_settings(model_dir))


def checkpoint_path(model_dir: str) -> Path:
    """Where the model itself is (not its converted copy): what sentence-transformers can load."""
    return model_source(_settings(model_dir))


class TokenCounter:
    """Tokens per text as the server counts them (special tokens included, cut at the model's max_tokens)."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self.max_tokens = bundle.config.max_tokens
        self._tokenizer = _native.Tokenizer(str(bundle.tokenizer_path), max_length=_UNCAPPED, pad_to_multiple_of=1)

    def uncapped(self, texts: Sequence[str]) -> NDArray[np.int64]:
        """Token counts without the model's cut-off."""
        if not texts:
            return np.zeros(0, dtype=np.int64)
        _, offsets = self._tokenizer.encode_ragged(list(texts))
        return np.diff(offsets)

    def count(self, texts: Sequence[str]) -> NDArray[np.int64]:
        return np.minimum(self.uncapped(texts), self.max_tokens)


def try_counter(model_dir: str) -> tuple[TokenCounter | None, str]:
    """A counter for the local model, or None and why not."""
    try:
        return TokenCounter(find_model(model_dir)), ""
    except EmbedpoolError as exc:
        return None, f"no local model to tokenize with ({exc}); pass --model DIR"
