"""The Go-style worker pool: bounded channels between ingress, the scheduler and one feeder thread per session."""

from embedpool.pool.admission import Permits
from embedpool.pool.feeder import InferenceSession
from embedpool.pool.pool import EmbeddingPool, Embeddings, PoolConfig, running_pool
from embedpool.pool.priority import Priority
from embedpool.pool.scheduler import Batch, BatchLimits

__all__ = [
    "Batch",
    "BatchLimits",
    "EmbeddingPool",
    "Embeddings",
    "InferenceSession",
    "Permits",
    "PoolConfig",
    "Priority",
    "running_pool",
]
