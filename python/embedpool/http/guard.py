"""The HTTP door's side of the security gate (service.gate), and the request id and body limit every request
passes first."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends
from opentelemetry import trace
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedpool import metrics, tracing
from embedpool.errors import EmbedpoolError, RequestTooLarge
from embedpool.http.errors import domain_error, error_response, log
from embedpool.logs import request_id
from embedpool.service.gate import Call, Gate
from embedpool.status import grpc_status

REQUEST_ID_HEADER = "x-request-id"
# A caller's time budget, in seconds: ours, and the one the OpenAI SDK sends (it stops reading after it, so
# work past it is wasted). The earlier wins; work not done by then is dropped with a 504.
TIMEOUT_HEADERS = ("x-request-timeout", "x-stainless-read-timeout")


def deadline(request: Request) -> float:
    """The request's deadline on anyio's clock (math.inf without a budget; an unparsable one is ignored)."""
    budget = math.inf
    for header in TIMEOUT_HEADERS:
        value = request.headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            continue
        if 0 < seconds < budget:
            budget = seconds
    return anyio.current_time() + budget if budget < math.inf else math.inf


class Gatekeeper:
    """Opens each API call at the gate and closes it with the call's outcome."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    @property
    def gate(self) -> Gate:
        return self._gate

    def opens(self, method: str) -> Any:
        """A route's `call: Call = keeper.opens("Embed")` parameter: a dependency, so the key is checked before
        the body is (a caller without a key learns nothing of the schema, as on gRPC), and the call is closed
        (usage booked, audit written) once the route's function ends, before its response is sent.
        `method`: the operation's gRPC name, so both doors audit and meter under the same names."""

        async def opened(request: Request) -> AsyncIterator[Call]:
            async with self.call(request, method) as call:
                yield call

        return Depends(opened, scope="function")

    @asynccontextmanager
    async def call(self, request: Request, method: str) -> AsyncIterator[Call]:
        peer = _peer(request)
        call = await self._gate.open(method, request.headers.get("authorization"), peer, request_id.get())
        request.state.embedpool_call = call  # RequestLimits books the response's bytes to it
        status = "UNKNOWN"
        try:
            yield call
            status = "OK"
        except EmbedpoolError as e:
            status = grpc_status(e).name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            await self._gate.close(call, status)  # raises Unavailable when an OK call's audit cannot be written


class RequestLimits:
    """ASGI middleware, outermost of ours: a request id for every request (the caller's `x-request-id`, else a new
    one), sent back in the response; bodies over `max_bytes` refused with 413 before they are read whole;
    whatever escapes the routes' own handling answered as a 500 with the request id here, so the connection
    stays usable (Starlette's last-resort handler closes it) and the id reaches the caller and the log; and the
    response's bytes booked to the caller's tenant, as gRPC books every reply."""

    def __init__(self, app: ASGIApp, max_bytes: int, gate: Gate) -> None:
        self._app = app
        self._max = max_bytes
        self._gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        rid = _incoming_id(scope) or uuid.uuid4().hex
        token = request_id.set(rid)
        if tracing.enabled:
            # The request's span is FastAPI's own (its OpenTelemetry support is on once a tracer provider is set:
            # the caller's trace context, route, status): it gets the request id, to find the call in the logs.
            trace.get_current_span().set_attribute("embedpool.request_id", rid)
        started = False
        status = 500
        sent = 0
        begun = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal started, status, sent
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), rid.encode())]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self._serve(scope, receive, send_with_id)
        except Exception as exc:
            log.error("unexpected error in %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            if started:
                raise  # the response is half sent: only dropping the connection tells the caller
            reply = error_response(500, f"internal error (request id {rid})", "server_error")
            await reply(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
            call = scope.get("state", {}).get("embedpool_call")
            if isinstance(call, Call):
                self._gate.book_bytes(call, sent)
            route = getattr(scope.get("route"), "path", "unmatched")  # the template: bounded label values
            metrics.HTTP_LATENCY.labels(route, str(status)).observe(time.perf_counter() - begun)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _content_length(scope)
        if declared is not None:
            if declared > self._max:
                await domain_error(_too_large(declared, self._max))(scope, receive, send)
                return
            await self._app(scope, receive, send)  # the server reads no more than it declared
            return
        # No length (chunked): read it here, up to the limit, and hand the app the whole body.
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self._max:
                await domain_error(_too_large(len(body), self._max))(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self._app(scope, replay, send)


def _too_large(size: int, limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"request body is {size} bytes or more, over the limit of {limit}")


def _incoming_id(scope: Scope) -> str:
    for key, value in scope.get("headers", ()):
        if key == REQUEST_ID_HEADER.encode() and 0 < len(value) <= 128:
            try:
                return str(value.decode("ascii"))
            except UnicodeDecodeError:
                return ""
    return ""


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _peer(request: Request) -> str:
    """As grpc names peers, so audit rows from both doors read alike."""
    if request.client is None:
        return ""
    host, port = request.client.host, request.client.port
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
