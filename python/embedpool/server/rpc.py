"""The wrapper every RPC goes through: request id, latency metric, access log, and the error mapping."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
import grpc.aio
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from embedpool import metrics
from embedpool.errors import EmbedpoolError, InvalidArgument, Overloaded
from embedpool.logs import request_id
from embedpool.security.tenancy import caller_view
from embedpool.server.decoding import Malformed
from embedpool.status import grpc_status as status_for

log = logging.getLogger("embedpool.rpc")

Method = TypeVar("Method", bound=Callable[..., Awaitable[Any]])

REQUEST_ID_KEY = "x-request-id"
_QUIET = (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)


def incoming_request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The id the server.auth interceptor took for this call, else the caller's `x-request-id`, else a new one."""
    rid = request_id.get()
    if rid:
        return rid
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: EmbedpoolError, rid: str) -> grpc.StatusCode:
    """Ends the call with `error`'s status (the one table in server.errors); raises grpc.aio.AbortError. The
    message names collections as the caller does; INTERNAL ones carry the request id, to find in the logs;
    a known retry delay goes along as google.rpc.RetryInfo, which gRPC clients' retry policies read."""
    code = status_for(error)
    message = caller_view(str(error))
    if code == grpc.StatusCode.INTERNAL:
        message = f"{message} (request id {rid})"
    if isinstance(error, Overloaded) and error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1, round(error.retry_after * 1e9)))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))
        await context.abort(status.code, status.details, (*status.trailing_metadata, (REQUEST_ID_KEY, rid)))
    await context.abort(code, message)
    raise AssertionError("unreachable: abort raises")


def _domain_error(group: ExceptionGroup[Exception]) -> Exception:
    leaves: list[Exception] = []
    pending: list[Exception] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, ExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return next((e for e in leaves if isinstance(e, EmbedpoolError)), leaves[0] if leaves else group)


def _malformed(message: Malformed) -> InvalidArgument:
    return InvalidArgument(f"request is not a valid {message.message_type} message")


async def _checked(requests: AsyncIterable[object]) -> AsyncIterator[object]:
    """A request stream that raises InvalidArgument at the first message that did not parse."""
    async for request in requests:
        if isinstance(request, Malformed):
            raise _malformed(request)
        yield request


def _counted(method: str, code: grpc.StatusCode, started: float) -> float:
    """Counts a call in the RPC latency histogram; its duration in seconds."""
    elapsed = time.perf_counter() - started
    metrics.RPC_LATENCY.labels(method, code.name).observe(elapsed)
    return elapsed


def rpc(method: Method) -> Method:
    """Wraps a servicer method (self, request, context) -> response."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: object, request: object, context: grpc.aio.ServicerContext[Any, Any], /) -> Any:
        rid = incoming_request_id(context)
        token = request_id.set(rid)
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        # A failure is counted before its status is sent, as a returned call is before its reply: a scrape right
        # after the caller hears the error sees it. None until counted.
        elapsed: float | None = None
        try:
            # In the trailers, which go with the status: sent as initial metadata it was a frame and a trip through
            # the completion queue of its own, an eighth of a small call's server CPU.
            context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
            if isinstance(request, Malformed):
                raise _malformed(request)
            if isinstance(request, AsyncIterable):
                request = _checked(request)
            try:
                return await method(self, request, context)
            except ExceptionGroup as group:  # from task groups inside a handler: surface the domain error
                raise _domain_error(group) from group
        except EmbedpoolError as exc:
            code = status_for(exc)
            elapsed = _counted(name, code, started)
            await abort(context, exc, rid)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("unexpected error in %s", name)
            elapsed = _counted(name, code, started)
            await context.abort(code, f"internal error (request id {rid}): {type(exc).__name__}")
        finally:
            if elapsed is None:
                elapsed = _counted(name, code, started)
            # Successful calls and refusals under load log at debug (metrics count them; a refusal a line would
            # flood the log exactly when it matters); other failures at info, with their request id.
            log.log(
                logging.DEBUG if code in _QUIET else logging.INFO,
                "%s %s",
                name,
                code.name,
                extra={"method": name, "code": code.name, "duration_ms": round(elapsed * 1000, 3)},
            )
            request_id.reset(token)
        raise AssertionError("unreachable: abort raises")

    return cast(Method, wrapper)
