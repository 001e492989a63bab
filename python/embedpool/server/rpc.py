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

from embedpool import metrics
from embedpool.errors import EmbedpoolError, InvalidArgument
from embedpool.logs import request_id
from embedpool.server.decoding import Malformed
from embedpool.server.errors import status_for

log = logging.getLogger("embedpool.rpc")

Method = TypeVar("Method", bound=Callable[..., Awaitable[Any]])

REQUEST_ID_KEY = "x-request-id"
_QUIET = (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)


def _incoming_request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex


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


def rpc(method: Method) -> Method:
    """Wraps a servicer method (self, request, context) -> response."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: object, request: object, context: grpc.aio.ServicerContext[Any, Any], /) -> Any:
        rid = _incoming_request_id(context)
        token = request_id.set(rid)
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            await context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
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
            message = str(exc) if code != grpc.StatusCode.INTERNAL else f"{exc} (request id {rid})"
            await context.abort(code, message)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("unexpected error in %s", name)
            await context.abort(code, f"internal error (request id {rid}): {type(exc).__name__}")
        finally:
            elapsed = time.perf_counter() - started
            metrics.RPC_LATENCY.labels(name, code.name).observe(elapsed)
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
