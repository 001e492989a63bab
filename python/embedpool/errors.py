"""Domain errors. Every layer raises these; embedpool.status maps each class to its gRPC and HTTP status.

Subclass the stdlib exception whose meaning matches, so code that does not know embedpool still
handles them sensibly.
"""

from __future__ import annotations


class EmbedpoolError(Exception):
    """Base of every error embedpool raises on purpose."""


class InvalidArgument(EmbedpoolError, ValueError):
    """The caller sent something malformed: the message says what and where."""


class RequestTooLarge(InvalidArgument):
    """More documents, ids or bytes in one request than the server's limits allow: split it (the client does)."""


class NotFound(EmbedpoolError, LookupError):
    """A named thing (collection, document) does not exist."""


class ModelNotFound(NotFound):
    """A request names a model this server does not serve."""

    code = "model_not_found"  # OpenAI's error code for it, which its SDK users match on


class AlreadyExists(EmbedpoolError):
    """Creating something whose name is taken with a different definition."""


class Overloaded(EmbedpoolError):
    """No capacity right now (permits or queue full, a quota spent); the caller may retry later, after
    `retry_after` seconds when that is known (sent to gRPC callers as google.rpc.RetryInfo)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unauthenticated(EmbedpoolError, PermissionError):
    """No credential, or one that is not valid (unknown, revoked, malformed)."""


class PermissionDenied(EmbedpoolError, PermissionError):
    """A valid credential whose role or collection grant does not cover the request."""


class DeadlineExceeded(EmbedpoolError, TimeoutError):
    """The caller's deadline passed before the work finished."""


class Unavailable(EmbedpoolError, ConnectionError):
    """A dependency (Postgres, an inference session) is down; retrying later may succeed."""


class InferenceFailed(EmbedpoolError, RuntimeError):
    """The inference engine failed on a batch: a server-side fault, not the caller's."""


class StartupError(EmbedpoolError, RuntimeError):
    """The server cannot start as configured (a port in use, a data directory another server owns, a database
    without pgvector): the message says what is wrong and what to change."""


def one_line(error: BaseException) -> str:
    """The error's message on one line: start-up failures quote Postgres and OS messages that span several."""
    return " ".join(str(error).split())
