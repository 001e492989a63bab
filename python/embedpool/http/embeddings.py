"""The OpenAI-compatible routes: POST /v1/embeddings, GET /v1/models."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from embedpool.errors import InvalidArgument
from embedpool.http import encoding
from embedpool.http.errors import ERRORS
from embedpool.http.guard import Gatekeeper, deadline
from embedpool.http.schemas import EmbeddingsRequest, EmbeddingsResponse, LongInputFields, ModelCard, ModelList
from embedpool.security.principal import Action
from embedpool.service import EmbeddingService
from embedpool.service import limits as check
from embedpool.service.gate import Call
from embedpool.service.models import ServedModel

_STARTED = int(time.time())


def router(service: EmbeddingService, keeper: Gatekeeper) -> APIRouter:
    api = APIRouter(tags=["OpenAI-compatible"])
    gate = keeper.gate
    models = service.models

    @api.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=ERRORS)
    async def create_embeddings(
        body: EmbeddingsRequest, request: Request, call: Call = keeper.opens("Embed")
    ) -> Response:
        """Embeds a text or a list of texts (OpenAI's embeddings API)."""
        gate.authorize(call, Action.EMBED)
        texts = _texts(body.input)
        served = models.named(body.model)  # ModelNotFound: OpenAI's 404 model_not_found
        gate.admit(call, len(texts))
        long_inputs = long_input_options(body, service.limits)
        embedded = await service.embed(
            texts,
            truncate=long_inputs.truncate,
            chunking=long_inputs.chunking,
            dimensions=body.dimensions,
            field="input",
            deadline=deadline(request),
            model=served.name,
            input_type=body.input_type,
        )
        tokens = sum(embedded.token_counts)
        vectors = encoding.vectors(embedded.vectors, body.encoding_format)
        answer: dict[str, object] = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "model": served.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        if embedded.window_counts is not None:
            answer["window_counts"] = embedded.window_counts  # embedpool: long_inputs chunk
        content = encoding.dumps(answer)
        return Response(content, media_type="application/json")

    def card(served: ServedModel) -> ModelCard:
        model = served.model
        return ModelCard(
            id=model.name,
            created=_STARTED,
            owned_by="embedpool",
            dim=model.dim,
            dimensions=sorted({model.dim, *model.dimensions}, reverse=True),
            max_tokens=model.max_tokens,
            variant=model.variant,
            device=model.device,
            prompts=dict(model.prompts),
            default_prompt_name=model.default_prompt_name or None,
            default=served is models.default,
        )

    @api.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def list_models(request: Request, call: Call = keeper.opens("GetModelInfo")) -> ModelList:
        gate.authorize(call, Action.EMBED)
        return ModelList(data=[card(served) for served in models])

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
    async def get_model(model_id: str, request: Request, call: Call = keeper.opens("GetModelInfo")) -> ModelCard:
        gate.authorize(call, Action.EMBED)
        return card(models.named(model_id))

    return api


def long_input_options(body: LongInputFields, limits: check.Limits) -> check.LongInputs:
    """The body's long-input options (its `truncate` counts only where the caller set it)."""
    return check.long_inputs(
        body.long_inputs or "",
        truncate=body.truncate if "truncate" in body.model_fields_set else None,
        overlap=body.chunk_overlap_tokens,
        max_windows=body.max_windows,
        limits=limits,
    )


def _texts(value: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    if isinstance(value, str):
        return [value]
    if value and not all(isinstance(item, str) for item in value):
        raise InvalidArgument("input: token-id arrays are not supported; send the texts")
    return [item for item in value if isinstance(item, str)]
