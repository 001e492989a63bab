"""The OpenAI-compatible routes: POST /v1/embeddings, GET /v1/models."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from embedpool.errors import InvalidArgument, NotFound
from embedpool.http import encoding
from embedpool.http.errors import ERRORS
from embedpool.http.guard import Gatekeeper, deadline
from embedpool.http.schemas import EmbeddingsRequest, EmbeddingsResponse, ModelCard, ModelList
from embedpool.security.principal import Action
from embedpool.service import EmbeddingService
from embedpool.service.gate import Call

_STARTED = int(time.time())


class ModelNotFound(NotFound):
    code = "model_not_found"


def router(service: EmbeddingService, keeper: Gatekeeper) -> APIRouter:
    api = APIRouter(tags=["OpenAI-compatible"])
    gate = keeper.gate
    model = service.model

    def check_model(name: str) -> None:
        # The checkpoint's name, its variant label, or a hub-style "org/name" ("sentence-transformers/...").
        if name not in (model.name, service.model_label) and name.rsplit("/", 1)[-1] != model.name:
            raise ModelNotFound(f"model: {name[:100]!r} is not served here; this server serves {model.name!r}")

    @api.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=ERRORS)
    async def create_embeddings(
        body: EmbeddingsRequest, request: Request, call: Call = keeper.opens("Embed")
    ) -> Response:
        """Embeds a text or a list of texts (OpenAI's embeddings API)."""
        gate.authorize(call, Action.EMBED)
        texts = _texts(body.input)
        check_model(body.model)
        gate.admit(call, len(texts))
        embedded = await service.embed(
            texts, truncate=body.truncate, dimensions=body.dimensions, field="input", deadline=deadline(request)
        )
        tokens = sum(embedded.token_counts)
        vectors = encoding.vectors(embedded.vectors, body.encoding_format)
        content = encoding.dumps(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "model": model.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
        return Response(content, media_type="application/json")

    def card() -> ModelCard:
        return ModelCard(
            id=model.name,
            created=_STARTED,
            owned_by="embedpool",
            dim=model.dim,
            dimensions=sorted({model.dim, *model.dimensions}, reverse=True),
            max_tokens=model.max_tokens,
            variant=model.variant,
            device=model.device,
        )

    @api.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def list_models(request: Request, call: Call = keeper.opens("GetModelInfo")) -> ModelList:
        gate.authorize(call, Action.EMBED)
        return ModelList(data=[card()])

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
    async def get_model(model_id: str, request: Request, call: Call = keeper.opens("GetModelInfo")) -> ModelCard:
        gate.authorize(call, Action.EMBED)
        check_model(model_id)
        return card()

    return api


def _texts(value: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    if isinstance(value, str):
        return [value]
    if value and not all(isinstance(item, str) for item in value):
        raise InvalidArgument("input: token-id arrays are not supported; send the texts")
    return [item for item in value if isinstance(item, str)]
