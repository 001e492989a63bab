"""embedpool: a gRPC embedding service with a Rust hot path, an ONNX Runtime worker pool and pgvector storage."""

from importlib.metadata import version

from embedpool.errors import (
    AlreadyExists,
    DeadlineExceeded,
    EmbedpoolError,
    InferenceFailed,
    InvalidArgument,
    NotFound,
    Overloaded,
    Unavailable,
)

__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "EmbedpoolError",
    "InferenceFailed",
    "InvalidArgument",
    "NotFound",
    "Overloaded",
    "Unavailable",
]
# Cargo.toml holds the one version; maturin writes it into the package metadata (pyproject's version is dynamic).
__version__ = version("embedpool")
