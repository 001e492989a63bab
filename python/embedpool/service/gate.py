"""The one security gate every door passes: credential, role and collection grant, tenant namespace, rate limit,
usage and audit. The gRPC door (server.auth) and the HTTP door (http.guard) call it with what their transport
carries; the core (service.core) never checks any of it.

Per call: the key is verified (Unauthenticated), the request's action and collection are authorized
(PermissionDenied), the collection name is moved into the caller's tenant namespace (security.tenancy: another
tenant's collection is then simply NotFound), the key's rate is checked (Overloaded with a retry delay; a stream
waits instead), and afterwards the call's usage is booked and, for writes, admin actions and refused
credentials, an audit event is appended.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import anyio

from embedpool import metrics
from embedpool.errors import EmbedpoolError, PermissionDenied, Unauthenticated, Unavailable
from embedpool.logs import request_id
from embedpool.security.audit import AuditEvent, Auditor
from embedpool.security.authenticator import Authenticator, parse_bearer
from embedpool.security.principal import Action, Principal, acting, authorize
from embedpool.security.quota import Quotas
from embedpool.security.tenancy import qualify, unqualify
from embedpool.security.usage import Usage, UsageBook, metering
from embedpool.service import limits

__all__ = ["Call", "Gate"]

_log = logging.getLogger("embedpool.auth")


@dataclass(slots=True)
class Call:
    """One call through the gate, from `open` to `close`."""

    rid: str
    method: str
    """The operation, named as the gRPC method (both doors audit and meter under the same names)."""
    peer: str
    principal: Principal
    usage: Usage
    collection: str = ""
    """As the caller named it."""
    audited: bool = False
    """Whether its outcome goes into the audit log (writes and admin actions; refusals always do)."""


class Gate:
    def __init__(self, authenticator: Authenticator, auditor: Auditor, usage: UsageBook, quotas: Quotas) -> None:
        self._auth = authenticator
        self._auditor = auditor
        self._book = usage
        self._quotas = quotas

    async def open(self, method: str, authorization: str | None, peer: str, rid: str) -> Call:
        """Authenticates the call (Unauthenticated, audited; Unavailable when the key store cannot be read), and
        makes its principal and usage this task's (security.principal.acting, security.usage.metering)."""
        request_id.set(rid)
        try:
            principal = await self._auth.authenticate(authorization)
        except Unauthenticated:
            metrics.AUTH_FAILURES.labels("UNAUTHENTICATED").inc()
            key_id = ""
            with contextlib.suppress(Unauthenticated):
                key_id = parse_bearer(authorization).id
            await self._audit(AuditEvent(rid, "", key_id, peer, method, status="UNAUTHENTICATED"))
            raise
        acting(principal)  # for key management and for messages naming collections as the caller does
        usage = Usage(requests=1)
        metering(usage)
        return Call(rid, method, peer, principal, usage)

    def authorize(self, call: Call, action: Action, collection: str = "", field: str = "collection") -> str:
        """Checks the role and collection grant; returns the collection moved into the caller's tenant namespace
        ("" for none). The caller's name may not contain "/", so it cannot reach another namespace."""
        if collection:
            limits.collection_name(collection, field, stored=False)  # before the audit row may record it
        call.collection = call.collection or collection
        try:
            authorize(call.principal, action, collection)
        except PermissionDenied:
            metrics.AUTH_FAILURES.labels("PERMISSION_DENIED").inc()
            raise
        return qualify(call.principal.tenant, collection) if collection else ""

    def admit(self, call: Call, documents: int) -> None:
        """The key's rate, for a call asking to embed `documents`: Overloaded with the delay when spent."""
        self._quotas.admit(call.principal, documents)

    async def pace(self, call: Call, documents: int) -> None:
        """For streams: waits until the key's rate allows `documents` more, rather than ending the stream (the
        caller's deadline still bounds it)."""
        while (wait := self._quotas.delay(call.principal, documents)) > 0:
            await anyio.sleep(wait)

    def caller_name(self, call: Call, name: str) -> str:
        """A stored collection name as the caller knows it."""
        return unqualify(call.principal.tenant, name) or name

    def visible(self, call: Call, names: Iterable[str]) -> list[tuple[str, str]]:
        """(stored, caller's) for the collections of the caller's tenant that its key may see."""
        shown = []
        for stored in names:
            name = unqualify(call.principal.tenant, stored)
            if name is not None and call.principal.may_see(name):
                shown.append((stored, name))
        return shown

    def book_bytes(self, call: Call, size: int) -> None:
        """Response bytes a door counted after the call closed (HTTP writes its response after the route ends)."""
        self._book.add(call.principal.tenant, Usage(bytes_out=size))

    async def close(self, call: Call, status: str) -> None:
        """Books the call's usage and charges its tokens; appends its audit event when it wrote, administered or
        was refused. `status`: the gRPC status name of its outcome. The audit of a call that succeeded must
        land: if it cannot, this raises Unavailable, for the call to fail with (its write is idempotent, and
        the retry is audited)."""
        self._book.add(call.principal.tenant, call.usage)
        self._quotas.charge_tokens(call.principal, call.usage.tokens)
        if not (call.audited or status == "PERMISSION_DENIED"):
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
            raise Unavailable("the audit log is unavailable; retry") from e

    async def _audit(self, event: AuditEvent) -> None:
        """For calls that failed anyway: a lost event is logged, and does not change the caller's answer."""
        try:
            await self._auditor.record(event)
        except EmbedpoolError as e:
            _log.warning("could not append the audit event of a failed %s: %s", event.method, e)
