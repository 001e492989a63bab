"""A server over its OpenAI-compatible HTTP API (POST /v1/embeddings), through httpx, each reply parsed into
vectors as a caller would."""

from __future__ import annotations

import base64
from typing import Any, Literal

import httpx
import numpy as np
import orjson

from embedpool.benchmark.credentials import Credentials
from embedpool.benchmark.target import ServerInfo
from embedpool.errors import PermissionDenied, Unauthenticated, Unavailable

__all__ = ["HttpTarget"]

Encoding = Literal["float", "base64"]


class HttpTarget:
    kind = "http"

    def __init__(
        self, url: str, credentials: Credentials, *, in_flight: int, timeout: float, encoding: Encoding
    ) -> None:
        self.addresses = [url.rstrip("/")]
        self._http = credentials.http_client(self.addresses[0], connections=max(1, in_flight), timeout=timeout)
        self._encoding = encoding
        self._model = ""

    async def info(self) -> ServerInfo:
        url = f"{self.addresses[0]}/v1/models"
        try:
            reply = await self._http.get("/v1/models")
        except httpx.HTTPError as exc:
            raise Unavailable(f"{url}: {type(exc).__name__}: {exc}") from None
        if reply.status_code != 200:
            refused = {401: Unauthenticated, 403: PermissionDenied}.get(reply.status_code, Unavailable)
            raise refused(f"{url} answered {reply.status_code}: {reply.text[:200]}")
        card: dict[str, Any] = reply.json()["data"][0]
        self._model = str(card["id"])
        return ServerInfo(
            self._model, int(card["dim"]), int(card["max_tokens"]), str(card["variant"]), str(card["device"])
        )

    async def embed(self, texts: list[str]) -> tuple[int, str | None]:
        body = orjson.dumps({"input": texts, "model": self._model, "encoding_format": self._encoding})
        try:
            reply = await self._http.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            return 0, type(exc).__name__
        if reply.status_code != 200:
            return 0, str(reply.status_code)
        data = orjson.loads(reply.content)["data"]
        vectors = [self._vector(item["embedding"]) for item in data]
        if len(vectors) != len(texts):
            return 0, "short_reply"
        return len(vectors), None

    def _vector(self, embedding: Any) -> np.ndarray[Any, np.dtype[np.float32]]:
        if self._encoding == "base64":
            return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
        return np.asarray(embedding, dtype=np.float32)

    async def aclose(self) -> None:
        await self._http.aclose()
