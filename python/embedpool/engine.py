"""Loads what inference needs for the configured model and device: tokenizer, sessions, serving metadata."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import onnxruntime as ort

from embedpool import _native
from embedpool.config import Settings
from embedpool.model import Device, EmbeddingSession, ModelBundle, Variant, default_checkpoint, load_model_dir
from embedpool.model.session import VariantChoice
from embedpool.pool import InferenceSession

log = logging.getLogger(__name__)

# Padding lengths to a multiple of 16 bounds the number of distinct shapes the engine sees (and warms).
PAD_MULTIPLE = 16


@dataclass(frozen=True)
class ServingModel:
    """What clients are told about the model (GetModelInfo) and what collections are tagged with."""

    name: str
    dim: int
    max_tokens: int
    variant: str
    device: str
    pooling: str


@dataclass(frozen=True)
class Engine:
    settings: Settings  # with device-derived defaults filled in
    bundle: ModelBundle
    tokenizer: _native.Tokenizer
    sessions: Sequence[InferenceSession]
    model: ServingModel
    pad_multiple: int


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


def serving_variant(requested: str, device: Device, bundle: ModelBundle) -> VariantChoice:
    """auto: the fused fp16 graph on a GPU. On CPU the int8 graph where the CPU has VNNI (u8 x s8 products
    saturate without it): its per-token scales give a text the same vector in any batch, within cos 0.995 of the
    reference, at 1.43x fused fp32 per CPU-second (bench/quantize.py). Elsewhere the session's choice, fused fp32."""
    if requested != "auto":
        return cast(Variant, requested)
    if device == "cpu" and "int8" in bundle.onnx and cpu_has_vnni():
        return "int8"
    return "auto"


def model_source(settings: Settings) -> Path:
    return Path(settings.model).expanduser() if settings.model else default_checkpoint()


def prepare(settings: Settings) -> ModelBundle:
    """Converts a safetensors checkpoint into the model cache if needed (idempotent), else loads the ONNX dir."""
    return load_model_dir(model_source(settings), cache_root=settings.data_dir / "models")


def warm_up(session: EmbeddingSession, settings: Settings, max_tokens: int, *, cuda: bool) -> None:
    """Runs every padded length once before the server reports ready: the first pass over a new shape was ~10x
    slower on the GPU. On a GPU each length is warmed at the largest batch the token budget allows for it."""
    for length in range(PAD_MULTIPLE, max_tokens + PAD_MULTIPLE, PAD_MULTIPLE):
        length = min(length, max_tokens)
        rows = max(1, min(settings.max_batch_size, settings.max_batch_tokens // length)) if cuda else 1
        ids = np.full((rows, length), 100, dtype=np.int64)  # any real token id; the values do not matter
        session.embed(ids, np.ones_like(ids))


def load_engine(settings: Settings) -> Engine:
    device = pick_device(settings.device)
    settings = settings.resolved(cuda=device == "cuda", cores=os.cpu_count())
    bundle = prepare(settings)
    variant = serving_variant(settings.variant, device, bundle)
    sessions = [
        EmbeddingSession(bundle, variant=variant, device=device, intra_op_threads=settings.intra_op_threads)
        for _ in range(settings.sessions_per_device)
    ]
    for session in sessions:
        warm_up(session, settings, bundle.config.max_tokens, cuda=device == "cuda")
    tokenizer = _native.Tokenizer(
        str(bundle.tokenizer_path), max_length=bundle.config.max_tokens, pad_to_multiple_of=PAD_MULTIPLE
    )
    model = ServingModel(
        name=bundle.config.name,
        dim=bundle.config.dim,
        max_tokens=bundle.config.max_tokens,
        variant=sessions[0].variant,
        device=device,
        pooling=bundle.config.pooling,
    )
    return Engine(settings, bundle, tokenizer, sessions, model, PAD_MULTIPLE)
