"""embedpool: a gRPC embedding service with a Rust hot path, an ONNX Runtime worker pool and pgvector storage."""

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
__version__ = "0.1.0"
