"""What a run drives: a running server, seen the same way whichever door it is reached through."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

__all__ = ["ServerInfo", "Target", "host_of"]


def host_of(address: str) -> str:
    """The host of "host:port", "[v6]:port" or a URL."""
    if "://" in address:
        return urlsplit(address).hostname or ""
    return address.rsplit(":", 1)[0].strip("[]")


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the server says about its model (GetModelInfo, or GET /v1/models)."""

    model: str
    dim: int
    max_tokens: int
    variant: str
    device: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Target(Protocol):
    kind: str
    """"grpc" or "http"."""
    addresses: list[str]

    async def info(self) -> ServerInfo: ...

    async def embed(self, texts: list[str]) -> tuple[int, str | None]:
        """Sends one request: (documents embedded, None), or (0, the failure's status)."""
        ...

    async def aclose(self) -> None: ...
