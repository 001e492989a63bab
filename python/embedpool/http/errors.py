"""Errors of the HTTP door in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status of
the one table (embedpool.status): the same outcome a gRPC caller gets, as the HTTP status that matches it.
A caller's mistake is never a 500, and no message carries a path, DSN or engine text (the core's messages
do not; anything unexpected is logged and answered with the request id only)."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from embedpool.errors import EmbedpoolError, Overloaded
from embedpool.http.schemas import ErrorResponse
from embedpool.logs import request_id
from embedpool.security.tenancy import caller_view
from embedpool.status import status_of

log = logging.getLogger("embedpool.http")

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": why}
    for status, why in {
        400: "invalid request",
        401: "no valid API key",
        403: "the key's role or collections do not allow it",
        404: "unknown model or collection",
        413: "over the server's request limits",
        429: "over the key's rate or the server's capacity (see Retry-After)",
        503: "unavailable: retry",
    }.items()
}
"""The error answers every /v1 route may give, for the OpenAPI document."""
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse, "description": "the collection exists with other index options"}
}

_PARAM = re.compile(r"^([A-Za-z_][\w.\[\]]*)(?:\[\d+\])?(?:\.\w+)*:")
_STATUS_TYPE = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error"}


def error_response(
    status: int, message: str, kind: str, *, param: str | None = None, code: str | None = None, headers: Any = None
) -> Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def domain_error(error: EmbedpoolError) -> Response:
    status = status_of(error)
    message = caller_view(str(error))
    if status.http >= 500 and status.http not in (503, 504):
        message = f"{message} (request id {request_id.get()})"
    headers = None
    if isinstance(error, Overloaded) and error.retry_after is not None:
        headers = {"Retry-After": str(max(1, math.ceil(error.retry_after)))}
    match = _PARAM.match(message)
    code = getattr(error, "code", None) or status.grpc.name.lower()
    return error_response(
        status.http, message, status.kind, param=match.group(1) if match else None, code=code, headers=headers
    )


def _validation(error: RequestValidationError) -> Response:
    first = error.errors()[0] if error.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "path", "query")]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid request"))
    return error_response(
        400, f"{param}: {message}" if param else message, "invalid_request_error", param=param, code="invalid_value"
    )


def install(app: FastAPI) -> None:
    async def on_domain(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EmbedpoolError)
        return domain_error(exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _validation(exc)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = _STATUS_TYPE.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
        return error_response(exc.status_code, str(exc.detail), kind, code=None, headers=exc.headers)

    app.add_exception_handler(EmbedpoolError, on_domain)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
