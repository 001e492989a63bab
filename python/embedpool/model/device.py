"""Which device inference runs on, and what the CPU can do."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from embedpool.model.session import Device


def pick_device(requested: str) -> Device:
    """`auto`: cuda where ONNX Runtime has the CUDA EP and an NVIDIA GPU is present (onnxruntime-gpu lists the
    EP on machines without one too)."""
    if requested == "cuda":
        return "cuda"
    if requested == "auto" and "CUDAExecutionProvider" in ort.get_available_providers() and _has_nvidia_gpu():
        return "cuda"
    return "cpu"


def _has_nvidia_gpu() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


def cpu_has_vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX-512 VNNI or AVX-VNNI)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags
