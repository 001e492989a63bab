"""The HTTP door as an ASGI application: OpenAI-compatible embeddings, collections, health and readiness, and the
OpenAPI 3.1 document generated from the routes (/openapi.json, interactive at /docs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from starlette.responses import Response

from embedpool import __version__
from embedpool.http import collections, embeddings, errors, syncs
from embedpool.http.guard import Gatekeeper, RequestLimits
from embedpool.http.schemas import Health
from embedpool.service import EmbeddingService
from embedpool.service.gate import Gate
from embedpool.service.syncs import Syncs

DESCRIPTION = """Embeddings and vector search over pgvector. `POST /v1/embeddings` speaks OpenAI's embeddings API
(the `openai` SDK and the frameworks built on it work with `base_url` set to this server's `/v1`). With
`--auth keys`, send `Authorization: Bearer <key>`. Errors have OpenAI's shape, `{"error": {...}}`, with the
status a gRPC caller would get, as its HTTP equivalent."""


def create_app(
    service: EmbeddingService, gate: Gate, ready: Callable[[], dict[str, bool]], sync_manager: Syncs
) -> FastAPI:
    """`ready`: the readiness checks by name (model warm, database reachable), each True when passing."""
    # FastAPIOffline: FastAPI whose /docs page loads Swagger UI from files in the wheel, not from a CDN that an
    # air-gapped machine cannot reach.
    app = FastAPIOffline(
        title="embedpool",
        version=__version__,
        description=DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        redirect_slashes=False,  # an API answers 404 in its own error shape, not an empty 307 to another path
    )
    errors.install(app)
    keeper = Gatekeeper(gate)
    app.include_router(embeddings.router(service, keeper))
    app.include_router(collections.router(service, keeper))
    app.include_router(syncs.router(sync_manager, keeper))

    @app.get("/health", response_model=Health, tags=["Operations"])
    async def health() -> Health:
        """Liveness: the process answers. No key needed."""
        return Health(status="ok")

    @app.get("/ready", response_model=Health, responses={503: {"model": Health}}, tags=["Operations"])
    async def readiness() -> Response:
        """Readiness: the model is warm and the database answers (503 otherwise). No key needed."""
        checks = ready()
        ok = all(checks.values())
        body = Health(status="ok" if ok else "unavailable", checks=checks)
        return Response(body.model_dump_json(), status_code=200 if ok else 503, media_type="application/json")

    app.add_middleware(RequestLimits, max_bytes=service.limits.max_request_bytes, gate=gate)
    app.openapi = _openapi(app)  # type: ignore[method-assign]  # FastAPI's documented way to amend it
    return app


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's document, made true to this server: it documents a 422 on every route with a body, which
    embedpool never sends (a schema mismatch is a 400 in OpenAI's shape), and no way to authenticate."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
                    if path.startswith("/v1/"):
                        operation["security"] = [{"apiKey": []}]
            components = schema.setdefault("components", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.get("schemas", {}).pop(unused, None)
            components["securitySchemes"] = {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (`embedpool keys create`), needed when the server runs --auth keys",
                }
            }
            app.openapi_schema = schema
        return app.openapi_schema

    return build
