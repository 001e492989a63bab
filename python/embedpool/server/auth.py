"""The gRPC door's side of the security gate (service.gate): an interceptor that passes every Embedder call
through it, with the rule of each method (its action, its collection field, whether it is audited). Health and
reflection pass untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import anyio
import grpc
import grpc.aio

from embedpool import tracing
from embedpool.errors import EmbedpoolError, PermissionDenied
from embedpool.logs import request_id
from embedpool.security.principal import Action
from embedpool.server.decoding import Malformed
from embedpool.server.rpc import abort, incoming_request_id
from embedpool.service.gate import Call, Gate
from embedpool.status import grpc_status
from embedpool.v1 import embedpool_pb2 as pb

__all__ = ["RULES", "Guard"]

SERVICE: Final = "embedpool.v1.Embedder"
SERVICE_PREFIX: Final = f"/{SERVICE}/"
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class Rule:
    action: Callable[[Any], Action]
    field: str
    """The request field naming the collection ("" for none)."""
    audited: Callable[[Any], bool]
    documents: Callable[[Any], int]
    """What the call asks to embed, for the documents/s rate."""


def _always(_: Any) -> bool:
    return True


def _never(_: Any) -> bool:
    return False


def _none(_: Any) -> int:
    return 0


def _fixed(action: Action) -> Callable[[Any], Action]:
    return lambda _: action


def _documents(request: Any) -> int:
    return len(request.documents)


RULES: Final[dict[str, Rule]] = {
    "Embed": Rule(
        lambda r: Action.WRITE if r.collection else Action.EMBED, "collection", lambda r: bool(r.collection), _documents
    ),
    "Ingest": Rule(_fixed(Action.WRITE), "collection", _always, _documents),
    "Search": Rule(_fixed(Action.READ), "collection", _never, lambda r: int(r.WhichOneof("query") == "text")),
    "GetCollection": Rule(_fixed(Action.READ), "name", _never, _none),
    "ListCollections": Rule(_fixed(Action.READ), "", _never, _none),
    "GetModelInfo": Rule(_fixed(Action.EMBED), "", _never, _none),
    "ListModels": Rule(_fixed(Action.EMBED), "", _never, _none),
    "CreateCollection": Rule(_fixed(Action.ADMIN), "name", _always, _none),
    "DropCollection": Rule(_fixed(Action.ADMIN), "name", _always, _none),
    "DeleteDocuments": Rule(_fixed(Action.WRITE), "collection", _always, _none),
    "CreateKey": Rule(_fixed(Action.MANAGE_KEYS), "", _always, _none),
    "ListKeys": Rule(_fixed(Action.MANAGE_KEYS), "", _never, _none),
    "RevokeKey": Rule(_fixed(Action.MANAGE_KEYS), "", _always, _none),
    "CreateSync": Rule(_fixed(Action.MANAGE_SYNCS), "collection", _always, _none),
    "ListSyncs": Rule(_fixed(Action.MANAGE_SYNCS), "", _never, _none),
    "GetSync": Rule(_fixed(Action.MANAGE_SYNCS), "", _never, _none),
    "PauseSync": Rule(_fixed(Action.MANAGE_SYNCS), "", _always, _none),
    "ResumeSync": Rule(_fixed(Action.MANAGE_SYNCS), "", _always, _none),
    "DropSync": Rule(_fixed(Action.MANAGE_SYNCS), "", _always, _none),
}
"""Every Embedder method, with what it does (a test checks that none is missing)."""


class Guard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic in the stubs only
    """Made before the gRPC server (interceptors are fixed at its creation), armed once the store is open."""

    def arm(self, gate: Gate) -> None:
        self._gate = gate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler  # type: ignore[return-value]  # None: grpc answers UNIMPLEMENTED
        name = method[len(SERVICE_PREFIX) :]
        rule = RULES.get(name, _NO_RULE)
        authorization = next(
            (v for k, v in details.invocation_metadata or () if k == "authorization" and isinstance(v, str)), None
        )
        # grpc.aio runs the servicer's coroutine functions; the stubs describe the sync API's callables.
        inner: Any = handler.stream_stream if handler.request_streaming else handler.unary_unary
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                _traced(name, self._streaming(name, rule, authorization, inner)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.request_streaming or handler.response_streaming:
            raise AssertionError(f"{method}: only unary and bidirectional methods are guarded")
        return grpc.unary_unary_rpc_method_handler(
            _traced(name, self._unary(name, rule, authorization, inner)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(
        self, name: str, rule: Rule, authorization: str | None, inner: Callable[[Any, Context], Awaitable[Any]]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def behavior(request: Any, context: Context) -> Any:
            call = await self._open(name, authorization, context)
            status = "UNKNOWN"
            try:
                if not isinstance(request, Malformed):  # the handler answers INVALID_ARGUMENT; nothing to check
                    call.audited = rule.audited(request)
                    try:
                        self._admit(call, rule, request)
                        self._gate.admit(call, rule.documents(request))
                    except EmbedpoolError as e:
                        status = grpc_status(e).name
                        await abort(context, e, call.rid)
                response = await inner(request, context)
                status = "OK"
                _to_caller(self._gate, call, response)
                call.usage.bytes_out += response.ByteSize()
                return response
            except grpc.aio.AbortError:
                status = status if status != "UNKNOWN" else _code(context)
                raise
            except BaseException:
                status = "CANCELLED"
                raise
            finally:
                await self._close(call, status, context)

        return behavior

    def _streaming(
        self, name: str, rule: Rule, authorization: str | None, inner: Callable[[Any, Context], Awaitable[None]]
    ) -> Callable[[AsyncIterator[Any], Context], Awaitable[None]]:
        async def behavior(requests: AsyncIterator[Any], context: Context) -> None:
            call = await self._open(name, authorization, context)
            call.audited = rule.audited(None)

            async def admitted() -> AsyncIterator[Any]:
                async for request in requests:
                    if not isinstance(request, Malformed):
                        self._admit(call, rule, request)
                        await self._gate.pace(call, rule.documents(request))
                    yield request

            ended = Ended()
            try:
                with ended.by(context):
                    await inner(admitted(), context)
            finally:
                await self._close(call, ended.status, context)

        return behavior

    async def _open(self, name: str, authorization: str | None, context: Context) -> Call:
        rid = incoming_request_id(context)
        try:
            return await self._gate.open(name, authorization, context.peer(), rid)
        except EmbedpoolError as e:  # Unauthenticated; Unavailable when the key store cannot be read
            await abort(context, e, rid)
            raise AssertionError("unreachable: abort raises") from e

    def _admit(self, call: Call, rule: Rule, request: Any) -> None:
        """Authorizes the request and moves its collection into the tenant's namespace."""
        collection = str(getattr(request, rule.field)) if rule.field else ""
        qualified = self._gate.authorize(call, rule.action(request), collection, rule.field)
        if qualified:
            setattr(request, rule.field, qualified)

    async def _close(self, call: Call, status: str, context: Context) -> None:
        try:
            await self._gate.close(call, status)
        except EmbedpoolError as e:  # the audit of a call that succeeded could not be written
            with anyio.CancelScope(shield=True):
                await abort(context, e, call.rid)


@dataclass(slots=True)
class Ended:
    status: str = "UNKNOWN"
    """The status name the call ended with."""

    @contextlib.contextmanager
    def by(self, context: Context) -> Iterator[None]:
        """Around a handler: OK when it returns, the code it aborted with, else CANCELLED (nothing else reaches
        here: the handler's wrapper, server.rpc, turns every other error into an abort)."""
        try:
            yield
            self.status = "OK"
        except grpc.aio.AbortError:
            self.status = _code(context)
            raise
        except BaseException:
            self.status = "CANCELLED"
            raise


Behavior = Callable[[Any, Context], Awaitable[Any]]


def _traced(name: str, behavior: Behavior) -> Behavior:
    """`behavior` inside the call's server span (W3C trace context from its metadata), when tracing is on; else
    `behavior` itself. Outermost, so that the gate's own work and the access log line are inside it."""
    if not tracing.enabled:
        return behavior

    async def traced(request: Any, context: Context) -> Any:
        attributes = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": name}
        with tracing.server_span(f"{SERVICE}/{name}", context.invocation_metadata() or (), attributes) as span:
            ended = Ended()
            try:
                with ended.by(context):
                    return await behavior(request, context)
            finally:
                span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[ended.status].value[0])
                span.set_attribute("embedpool.request_id", request_id.get())
                if ended.status != "OK":
                    tracing.failed(span, ended.status)

    return traced


def _code(context: Context) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _unruled(_: Any) -> Action:
    raise PermissionDenied("this method has no authorization rule")


_NO_RULE: Final = Rule(_unruled, "", _never, _none)
"""A method added to the proto without a rule is refused, never open."""


def _to_caller(gate: Gate, call: Call, response: Any) -> None:
    """Collections in a response named as the caller's tenant knows them; other tenants' left out."""
    if isinstance(response, pb.Collection):
        response.name = gate.caller_name(call, response.name)
    elif isinstance(response, pb.ListCollectionsResponse):
        by_name = {c.name: c for c in response.collections}
        visible = []
        for stored, name in gate.visible(call, by_name):
            by_name[stored].name = name
            visible.append(by_name[stored])
        del response.collections[:]
        response.collections.extend(visible)
