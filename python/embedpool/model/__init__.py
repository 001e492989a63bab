"""Model layer: read checkpoints, build and convert ONNX graphs, run inference sessions."""

from embedpool.model.checkpoint import ModelConfig, Pooling, load_config
from embedpool.model.convert import (
    ALL_VARIANTS,
    CONVERTER_VERSION,
    ConversionError,
    Variant,
    convert_checkpoint,
    fused_operator_statistics,
    prepare_model,
)
from embedpool.model.loader import ModelBundle, default_checkpoint, load_model_dir
from embedpool.model.pooling import SENTENCE_EMBEDDING, append_pooling
from embedpool.model.session import Device, EmbeddingSession

__all__ = [
    "ALL_VARIANTS",
    "CONVERTER_VERSION",
    "SENTENCE_EMBEDDING",
    "ConversionError",
    "Device",
    "EmbeddingSession",
    "ModelBundle",
    "ModelConfig",
    "Pooling",
    "Variant",
    "append_pooling",
    "convert_checkpoint",
    "default_checkpoint",
    "fused_operator_statistics",
    "load_config",
    "load_model_dir",
    "prepare_model",
]
