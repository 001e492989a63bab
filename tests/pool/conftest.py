"""The real tokenizer and a real fp32 CPU session of the default model, for driving the pool directly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from embedpool import _native
from embedpool.model import EmbeddingSession, ModelBundle, load_model_dir


@pytest.fixture(scope="session")
def bundle(model_dir: Path) -> ModelBundle:
    return load_model_dir(model_dir)


@pytest.fixture(scope="session")
def session(bundle: ModelBundle) -> EmbeddingSession:
    return EmbeddingSession(bundle, variant="fp32", device="cpu", intra_op_threads=2)


@pytest.fixture(scope="session")
def tokenizer(bundle: ModelBundle) -> _native.Tokenizer:
    return _native.Tokenizer(str(bundle.tokenizer_path), max_length=bundle.config.max_tokens, pad_to_multiple_of=16)


@pytest.fixture
def poisoned(session: EmbeddingSession, tokenizer: _native.Tokenizer, poisoned_session: Callable[..., Any]) -> Any:
    """The real session, failing every batch that holds the word "zeppelin" (a poison document)."""
    ids, _ = tokenizer.encode_ragged(["zeppelin"])
    return poisoned_session(session, poison=int(ids[1]))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
