"""A server, or replicas taken in turn, over gRPC through embedpool.client.AsyncClient: what an application
calling embedpool from Python pays, vector decoding included."""

from __future__ import annotations

from embedpool.benchmark.credentials import Credentials
from embedpool.benchmark.target import ServerInfo
from embedpool.client import AsyncClient, RetryPolicy
from embedpool.errors import EmbedpoolError

__all__ = ["GrpcTarget"]


class GrpcTarget:
    kind = "grpc"

    def __init__(self, targets: str, credentials: Credentials, *, in_flight: int, timeout: float, retries: int) -> None:
        # Retries off by default: a refusal is counted as the server gave it, not hidden behind a later success.
        # Split calls in flight: one per concurrent request the run may make (the client's default is 4).
        self._client = AsyncClient(
            targets,
            api_key=credentials.api_key,
            tls_ca=credentials.tls_ca,
            tls_cert=credentials.tls_cert,
            tls_key=credentials.tls_key,
            timeout=timeout,
            retry=RetryPolicy(max_attempts=1 + retries),
            concurrency=max(1, in_flight),
        )
        self.addresses = self._client.targets

    async def info(self) -> ServerInfo:
        info = await self._client.model_info()
        return ServerInfo(info.name, info.dim, info.max_tokens, info.variant, info.device)

    async def embed(self, texts: list[str]) -> tuple[int, str | None]:
        try:
            vectors = await self._client.embed(texts)
        except EmbedpoolError as exc:
            return 0, type(exc).__name__
        if len(vectors) != len(texts):
            return 0, "short_reply"
        return len(vectors), None

    async def aclose(self) -> None:
        await self._client.close()
