"""Root fixtures: hypothesis profiles (HYPOTHESIS_PROFILE=ci|dev|thorough), the golden data, the real model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from numpy.typing import NDArray

DATA = Path(__file__).resolve().parent / "data"

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def golden() -> tuple[list[str], NDArray[np.float32]]:
    meta = json.loads((DATA / "minilm_golden.json").read_text())
    return meta["texts"], np.load(DATA / "minilm_golden.npy")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The converted default model, from the user's cache (`make model` fills it; converted here otherwise)."""
    from embedpool.config import Settings
    from embedpool.engine import prepare

    return prepare(Settings()).root
