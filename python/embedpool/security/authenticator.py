"""API key verification: `authorization: Bearer <key>` to a Principal, with the key rows cached.

Keys are cached by id only while a LISTEN connection hears of every change to api_keys (store.notified), so a
revocation reaches every server sharing the database as soon as its notification does, and a server that is
not listening reads the row on every request rather than trust a copy. Unknown ids are cached too (as
absent), so a flood of made-up keys costs no database reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

from embedpool.errors import Unauthenticated
from embedpool.security import keys
from embedpool.security.keys import ParsedKey
from embedpool.security.principal import ANONYMOUS, Principal, Role
from embedpool.store import Store
from embedpool.store import keys as key_rows
from embedpool.store.notified import NotifiedCache

__all__ = ["Authenticator", "parse_bearer"]

_BEARER = "bearer "


@dataclass(frozen=True, slots=True)
class _Entry:
    secret_hash: bytes
    principal: Principal
    revoked: bool


def parse_bearer(authorization: str | None) -> ParsedKey:
    """The key in an `authorization` header value; Unauthenticated when there is none or it is malformed."""
    if not authorization:
        raise Unauthenticated("this server needs an API key: send the metadata 'authorization: Bearer <key>'")
    if not authorization[: len(_BEARER)].lower() == _BEARER:
        raise Unauthenticated("the authorization metadata must be 'Bearer <key>'")
    parsed = keys.parse(authorization[len(_BEARER) :].strip())
    if parsed is None:
        raise Unauthenticated("the API key is malformed")
    return parsed


class Authenticator:
    def __init__(self, store: Store, *, required: bool) -> None:
        """`required`: keys are checked; otherwise every caller is ANONYMOUS (the default tenant's admin)."""
        self.required = required
        self._store = store
        self._cache: NotifiedCache[_Entry | None] = NotifiedCache(key_rows.CHANNEL)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The key cache for the block (without it, each request reads its key's row)."""
        if not self.required:
            yield
            return
        async with anyio.create_task_group() as tg:
            await tg.start(self._cache.watch, self._store.url)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()

    async def verify(self, parsed: ParsedKey) -> Principal:
        """The key's principal; Unauthenticated for an unknown, wrong or revoked key (one message for the
        first two, so a guess learns nothing about which ids exist)."""
        entry = await self._entry(parsed.id)
        if entry is None or not keys.matches(parsed, entry.secret_hash):
            raise Unauthenticated("the API key is not valid")
        if entry.revoked:
            raise Unauthenticated("the API key was revoked")
        return entry.principal

    async def authenticate(self, authorization: str | None) -> Principal:
        if not self.required:
            return ANONYMOUS
        return await self.verify(parse_bearer(authorization))

    async def _entry(self, key_id: str) -> _Entry | None:
        cached, entry = self._cache.lookup(key_id)
        if cached:
            return entry
        generation = self._cache.generation
        async with self._store.connection() as conn:
            record = await key_rows.lookup(conn, key_id)
        entry = None if record is None else _entry_of(record)
        self._cache.put(key_id, entry, generation)
        return entry


def _entry_of(record: key_rows.KeyRecord) -> _Entry:
    principal = Principal(
        tenant=record.tenant,
        role=Role.parse(record.role),
        key_id=record.id,
        collections=record.collections,
        tokens_per_s=record.tokens_per_s,
        docs_per_s=record.docs_per_s,
    )
    return _Entry(record.secret_hash, principal, record.revoked_at is not None)
