"""Which variant `auto` serves, and that the engine loads it with every padded length warmed."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from embedpool.config import Settings
from embedpool.engine import cpu_has_vnni, load_engine, pick_device, serving_variant
from embedpool.errors import StartupError
from embedpool.model import device as device_module
from embedpool.model import load_model_dir


def test_auto_variant_follows_the_device(model_dir: Path) -> None:
    bundle = load_model_dir(model_dir)
    assert serving_variant("fp32", "cpu", bundle) == "fp32"
    assert serving_variant("auto", "cuda", bundle) == "auto"  # the session picks fused fp16 there
    assert serving_variant("auto", "cpu", bundle) == ("int8" if cpu_has_vnni() else "auto")


def test_engine_reports_the_variant_it_serves(model_dir: Path) -> None:
    engine = load_engine(Settings(model=str(model_dir), matryoshka_dims=(256, 128)))
    assert engine.model.device == "cpu"
    assert engine.model.variant == ("int8" if cpu_has_vnni() else "fp32_opt")
    assert engine.settings.max_batch_tokens == 8192 and engine.pad_multiple == 16
    assert (engine.model.dim, engine.model.dimensions) == (384, (256, 128))


@pytest.mark.parametrize("dims", [(384,), (512, 128)])
def test_matryoshka_sizes_must_be_below_the_model_dimension(model_dir: Path, dims: tuple[int, ...]) -> None:
    with pytest.raises(StartupError, match=r"^matryoshka_dims: .*dimension 384"):
        load_engine(Settings(model=str(model_dir), matryoshka_dims=dims))


@pytest.mark.parametrize(
    ("providers", "gpu", "device"),
    [
        (["CPUExecutionProvider"], False, "cpu"),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], False, "cpu"),  # onnxruntime-gpu on a CPU box
        (["CUDAExecutionProvider", "CPUExecutionProvider"], True, "cuda"),
    ],
)
def test_auto_device_needs_the_cuda_provider_and_a_gpu(
    monkeypatch: pytest.MonkeyPatch, providers: list[str], gpu: bool, device: str
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: providers)
    monkeypatch.setattr(device_module, "_has_nvidia_gpu", lambda: gpu)
    assert pick_device("auto") == device
    assert (pick_device("cpu"), pick_device("cuda")) == ("cpu", "cuda")  # asked for: no second-guessing
