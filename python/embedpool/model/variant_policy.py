"""Which graph variant a server serves when the operator leaves it to `auto`."""

from __future__ import annotations

from typing import cast

from embedpool.model.convert import Variant
from embedpool.model.device import cpu_has_vnni
from embedpool.model.loader import ModelBundle
from embedpool.model.session import Device, VariantChoice


def serving_variant(requested: str, device: Device, bundle: ModelBundle) -> VariantChoice:
    """auto: the fused fp16 graph on a GPU. On CPU the int8 graph where the CPU has VNNI (u8 x s8 products
    saturate without it): its per-token scales give a text the same vector in any batch, within cos 0.995 of the
    reference, at 1.43x fused fp32 per CPU-second (bench/quantize.py). Elsewhere the session's choice, fused fp32."""
    if requested != "auto":
        return cast(Variant, requested)
    if device == "cpu" and "int8" in bundle.onnx and cpu_has_vnni():
        return "int8"
    return "auto"
