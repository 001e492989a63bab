"""Key management: create (the key is returned once), list, revoke. Used by `embedpool keys` and by admins."""

from __future__ import annotations

import math

from embedpool.errors import InvalidArgument
from embedpool.security import keys
from embedpool.security.principal import Role
from embedpool.security.tenancy import check_tenant
from embedpool.store import Store
from embedpool.store import keys as key_rows
from embedpool.store.keys import KeyRecord

__all__ = ["KeyRecord", "create_key", "list_keys", "revoke_key"]

_MAX_GLOB_CHARS = 255


def _rate(name: str, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise InvalidArgument(f"{name} must be a positive number, got {value}")
    return value


async def create_key(
    store: Store,
    *,
    tenant: str,
    role: str,
    collections: str = "*",
    tokens_per_s: float | None = None,
    docs_per_s: float | None = None,
    note: str = "",
) -> tuple[str, KeyRecord]:
    """A new key for `tenant`: (the key, shown this once and stored only as a hash; its row)."""
    check_tenant(tenant)
    try:
        role = Role.parse(role).label
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    if not collections or len(collections) > _MAX_GLOB_CHARS or "/" in collections or "\x00" in collections:
        raise InvalidArgument(f"collections: a glob of 1-{_MAX_GLOB_CHARS} characters without '/', got {collections!r}")
    if "\x00" in note:  # Postgres text cannot hold NUL
        raise InvalidArgument("note: must not contain NUL characters")
    text, parsed = keys.generate()
    async with store.connection() as conn:
        record = await key_rows.insert(
            conn,
            id=parsed.id,
            secret_hash=keys.secret_hash(parsed.secret),
            tenant=tenant,
            role=role,
            collections=collections,
            tokens_per_s=_rate("tokens_per_s", tokens_per_s),
            docs_per_s=_rate("docs_per_s", docs_per_s),
            note=note[:200],
        )
    return text, record


async def list_keys(store: Store, tenant: str | None = None) -> list[KeyRecord]:
    async with store.connection() as conn:
        return await key_rows.list_keys(conn, tenant)


async def revoke_key(store: Store, key_id: str, tenant: str | None = None) -> KeyRecord:
    """Revoked at once on every server sharing the database (each drops the key from its cache on the
    notification); NotFound for an unknown id (or another tenant's, when `tenant` is given)."""
    if not keys.is_key_id(key_id):
        raise InvalidArgument(f"id: {key_id[:40]!r} is not a key id (12 hex digits, as `keys list` shows)")
    async with store.connection() as conn:
        return await key_rows.revoke(conn, key_id, tenant)
