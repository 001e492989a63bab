"""`embedpool bench`: throughput and latency of a running embedpool (gRPC or HTTP, one server or replicas) or of
the engine alone, with the best raw ONNX Runtime loop (and sentence-transformers, when importable) on the same
model in the same run. A client-side tool: it reaches a server only through embedpool.client and HTTP.

Importing this package loads only the flags (`add_arguments`); `embedpool.benchmark.command.run` runs a benchmark.
"""

from embedpool.benchmark.options import add_arguments

__all__ = ["add_arguments"]
