"""The one error table: each domain error's gRPC status and HTTP status, for every door and for the client.

A caller's mistake is never UNKNOWN/INTERNAL/500: anything not in this table is a bug on our side, reported as
INTERNAL (HTTP 500) with the request id so it can be found in the logs. The client maps statuses back to the
same domain errors (`error_for_grpc`), so code calling embedpool catches one set of exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import grpc

from embedpool.errors import (
    AlreadyExists,
    DeadlineExceeded,
    EmbedpoolError,
    InferenceFailed,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    RequestTooLarge,
    Unauthenticated,
    Unavailable,
)

__all__ = ["STATUS", "Status", "error_for_grpc", "grpc_status", "http_status", "status_of"]


@dataclass(frozen=True, slots=True)
class Status:
    grpc: grpc.StatusCode
    http: int
    kind: str
    """OpenAI's error `type` for the HTTP door."""


STATUS: Final[dict[type[EmbedpoolError], Status]] = {
    InvalidArgument: Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    RequestTooLarge: Status(grpc.StatusCode.INVALID_ARGUMENT, 413, "invalid_request_error"),
    Unauthenticated: Status(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    PermissionDenied: Status(grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
    NotFound: Status(grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
    AlreadyExists: Status(grpc.StatusCode.ALREADY_EXISTS, 409, "conflict_error"),
    Overloaded: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    DeadlineExceeded: Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
    Unavailable: Status(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error"),
    InferenceFailed: Status(grpc.StatusCode.INTERNAL, 500, "server_error"),
}
_INTERNAL: Final = Status(grpc.StatusCode.INTERNAL, 500, "server_error")


def status_of(error: BaseException) -> Status:
    for cls in type(error).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return _INTERNAL


def grpc_status(error: BaseException) -> grpc.StatusCode:
    return status_of(error).grpc


def http_status(error: BaseException) -> int:
    return status_of(error).http


_ERROR_FOR_GRPC: Final = {
    status.grpc: cls for cls, status in STATUS.items() if cls not in (InferenceFailed, RequestTooLarge)
}


def error_for_grpc(code: grpc.StatusCode | None, message: str) -> EmbedpoolError:
    """The domain error a gRPC status stands for (InferenceFailed for INTERNAL, UNKNOWN and the rest)."""
    cls = _ERROR_FOR_GRPC.get(code) if code is not None else None
    return (cls or InferenceFailed)(message)
