"""The one gate every Embedder RPC passes: credential, role and collection grant, tenant namespace, rate limit,
usage and audit. Handlers never check any of it; health and reflection pass untouched.

Per call: the key is verified (UNAUTHENTICATED), the request's action and collection are authorized
(PERMISSION_DENIED), the collection name is moved into the caller's tenant namespace (security.tenancy:
another tenant's collection is then simply NOT_FOUND), the key's rate is checked (RESOURCE_EXHAUSTED with
RetryInfo; an Ingest stream waits instead), and afterwards the call's usage is booked and, for writes, admin
actions and refused credentials, an audit event is appended.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import anyio
import grpc
import grpc.aio

from embedpool import metrics
from embedpool.errors import EmbedpoolError, PermissionDenied, Unauthenticated, Unavailable
from embedpool.logs import request_id
from embedpool.security.audit import AuditEvent, Auditor
from embedpool.security.authenticator import Authenticator, parse_bearer
from embedpool.security.principal import Action, Principal, acting, authorize
from embedpool.security.quota import Quotas
from embedpool.security.tenancy import qualify, unqualify
from embedpool.security.usage import Usage, UsageBook, metering
from embedpool.server import validation
from embedpool.server.decoding import Malformed
from embedpool.server.rpc import abort, incoming_request_id
from embedpool.status import grpc_status as status_for
from embedpool.v1 import embedpool_pb2 as pb

__all__ = ["RULES", "Guard"]

_log = logging.getLogger("embedpool.auth")
SERVICE_PREFIX: Final = "/embedpool.v1.Embedder/"
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
    "CreateCollection": Rule(_fixed(Action.ADMIN), "name", _always, _none),
    "DropCollection": Rule(_fixed(Action.ADMIN), "name", _always, _none),
    "DeleteDocuments": Rule(_fixed(Action.WRITE), "collection", _always, _none),
    "CreateKey": Rule(_fixed(Action.MANAGE_KEYS), "", _always, _none),
    "ListKeys": Rule(_fixed(Action.MANAGE_KEYS), "", _never, _none),
    "RevokeKey": Rule(_fixed(Action.MANAGE_KEYS), "", _always, _none),
}
"""Every Embedder method, with what it does (a test checks that none is missing)."""


@dataclass(slots=True)
class _Call:
    rid: str
    method: str
    peer: str
    principal: Principal
    usage: Usage
    collection: str = ""
    """As the caller named it."""


class Guard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic in the stubs only
    """Made before the gRPC server (interceptors are fixed at its creation), armed once the store is open."""

    def arm(self, authenticator: Authenticator, auditor: Auditor, usage: UsageBook, quotas: Quotas) -> None:
        self._auth = authenticator
        self._auditor = auditor
        self._book = usage
        self._quotas = quotas

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
                self._streaming(name, rule, authorization, inner),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.request_streaming or handler.response_streaming:
            raise AssertionError(f"{method}: only unary and bidirectional methods are guarded")
        return grpc.unary_unary_rpc_method_handler(
            self._unary(name, rule, authorization, inner),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(
        self, name: str, rule: Rule, authorization: str | None, inner: Callable[[Any, Context], Awaitable[Any]]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def behavior(request: Any, context: Context) -> Any:
            call = await self._open(name, authorization, context)
            status, audited = "UNKNOWN", False
            try:
                if not isinstance(request, Malformed):  # the handler answers INVALID_ARGUMENT; nothing to check
                    audited = rule.audited(request)
                    try:
                        self._admit(call, rule, request)
                        self._quotas.admit(call.principal, rule.documents(request))
                    except EmbedpoolError as e:
                        status = status_for(e).name
                        await abort(context, e, call.rid)
                response = await inner(request, context)
                status = "OK"
                _to_caller(call.principal, response)
                call.usage.bytes_out += response.ByteSize()
                return response
            except grpc.aio.AbortError:
                status = status if status != "UNKNOWN" else _code(context)
                raise
            except BaseException:
                status = "CANCELLED"
                raise
            finally:
                await self._close(call, status, audited, context)

        return behavior

    def _streaming(
        self, name: str, rule: Rule, authorization: str | None, inner: Callable[[Any, Context], Awaitable[None]]
    ) -> Callable[[AsyncIterator[Any], Context], Awaitable[None]]:
        async def behavior(requests: AsyncIterator[Any], context: Context) -> None:
            call = await self._open(name, authorization, context)
            status = "UNKNOWN"

            async def admitted() -> AsyncIterator[Any]:
                async for request in requests:
                    if not isinstance(request, Malformed):
                        self._admit(call, rule, request)
                        # A stream is slowed to its key's rate rather than ended: it waits as it does for
                        # room in the admission budget (the caller's deadline still bounds it).
                        while (wait := self._quotas.delay(call.principal, rule.documents(request))) > 0:
                            await anyio.sleep(wait)
                    yield request

            try:
                await inner(admitted(), context)
                status = "OK"
            except grpc.aio.AbortError:
                status = _code(context)
                raise
            except BaseException:
                status = "CANCELLED"
                raise
            finally:
                await self._close(call, status, rule.audited(None), context)

        return behavior

    async def _open(self, name: str, authorization: str | None, context: Context) -> _Call:
        """Authenticates the call; on failure audits it and ends it with UNAUTHENTICATED."""
        rid = incoming_request_id(context)
        request_id.set(rid)  # this task's, which the handler runs in
        try:
            principal = await self._auth.authenticate(authorization)
        except Unauthenticated as e:
            metrics.AUTH_FAILURES.labels("UNAUTHENTICATED").inc()
            key_id = ""
            with contextlib.suppress(Unauthenticated):
                key_id = parse_bearer(authorization).id
            await self._audit(AuditEvent(rid, "", key_id, context.peer(), name, status="UNAUTHENTICATED"))
            await abort(context, e, rid)
        except EmbedpoolError as e:  # the key store is unreachable: UNAVAILABLE, retryable
            await abort(context, e, rid)
        acting(principal)  # for key management and for messages naming collections as the caller does
        usage = Usage(requests=1)
        metering(usage)
        return _Call(rid, name, context.peer(), principal, usage)

    def _admit(self, call: _Call, rule: Rule, request: Any) -> None:
        """Authorizes the request and moves its collection into the tenant's namespace."""
        collection = str(getattr(request, rule.field)) if rule.field else ""
        call.collection = call.collection or collection
        try:
            authorize(call.principal, rule.action(request), collection)
        except PermissionDenied:
            metrics.AUTH_FAILURES.labels("PERMISSION_DENIED").inc()
            raise
        if collection:
            validation.collection_name(collection, rule.field, stored=False)  # no "/": no other namespace
            setattr(request, rule.field, qualify(call.principal.tenant, collection))

    async def _close(self, call: _Call, status: str, audited: bool, context: Context) -> None:
        """Books the call's usage and charges its tokens; appends its audit event when it wrote, administered or
        was refused. The audit of a call that succeeded must land: if it cannot, the call fails UNAVAILABLE
        (its write is idempotent, and the retry is audited)."""
        self._book.add(call.principal.tenant, call.usage)
        self._quotas.charge_tokens(call.principal, call.usage.tokens)
        if not (audited or status == "PERMISSION_DENIED"):
            return
        p = call.principal
        event = AuditEvent(
            call.rid, p.tenant, p.key_id, call.peer, call.method, call.collection, call.usage.documents, status
        )
        if status != "OK":
            await self._audit(event)
            return
        try:
            await self._auditor.record(event)
        except EmbedpoolError as e:
            _log.error("could not append the audit event of %s (request %s): %s", call.method, call.rid, e)
            with anyio.CancelScope(shield=True):
                await abort(context, Unavailable("the audit log is unavailable; retry"), call.rid)

    async def _audit(self, event: AuditEvent) -> None:
        """For calls that failed anyway: a lost event is logged, and does not change the caller's answer."""
        try:
            await self._auditor.record(event)
        except EmbedpoolError as e:
            _log.warning("could not append the audit event of a failed %s: %s", event.method, e)


def _code(context: Context) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _unruled(_: Any) -> Action:
    raise PermissionDenied("this method has no authorization rule")


_NO_RULE: Final = Rule(_unruled, "", _never, _none)
"""A method added to the proto without a rule is refused, never open."""


def _to_caller(principal: Principal, response: Any) -> None:
    """Collections in a response named as the caller's tenant knows them; other tenants' left out."""
    if isinstance(response, pb.Collection):
        response.name = unqualify(principal.tenant, response.name) or response.name
    elif isinstance(response, pb.ListCollectionsResponse):
        visible = []
        for collection in response.collections:
            name = unqualify(principal.tenant, collection.name)
            if name is not None and principal.may_see(name):
                collection.name = name
                visible.append(collection)
        del response.collections[:]
        response.collections.extend(visible)
