"""The one table from domain errors to gRPC status codes.

A caller's mistake is never UNKNOWN or INTERNAL: anything not in this table is a bug on our side and is
reported as INTERNAL with the request id, so it can be found in the logs.
"""

from __future__ import annotations

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
    Unauthenticated,
    Unavailable,
)

STATUS_FOR: dict[type[EmbedpoolError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    InferenceFailed: grpc.StatusCode.INTERNAL,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(error: EmbedpoolError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        code = STATUS_FOR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
