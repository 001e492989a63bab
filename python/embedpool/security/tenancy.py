"""Tenants own collections: each tenant's names live in a namespace of their own.

A tenant's collection `docs` is stored as `<tenant>/docs`; the default tenant's names are stored as they are,
so collections made before keys existed belong to it. Request names cannot contain "/", so no tenant can
name another's collection: to it, another tenant's collection does not exist (NOT_FOUND, not a refusal).
"""

from __future__ import annotations

import re
from typing import Final

from embedpool.errors import InvalidArgument
from embedpool.security.principal import DEFAULT_TENANT, current

__all__ = ["DEFAULT_TENANT", "TENANT_NAME", "caller_view", "check_tenant", "qualify", "unqualify"]

TENANT_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_SEPARATOR: Final = "/"


def check_tenant(tenant: str) -> str:
    if not TENANT_NAME.fullmatch(tenant):
        raise InvalidArgument(f"tenant: {tenant[:80]!r} is not a valid name (1-63 of a-z 0-9 _ -, first a-z 0-9)")
    return tenant


def qualify(tenant: str, name: str) -> str:
    """The stored name of `tenant`'s collection `name` (an empty name stays empty: no collection)."""
    if not name or tenant == DEFAULT_TENANT:
        return name
    return f"{tenant}{_SEPARATOR}{name}"


def unqualify(tenant: str, stored: str) -> str | None:
    """The name `tenant` knows a stored collection by, or None when it is another tenant's."""
    if tenant == DEFAULT_TENANT:
        return None if _SEPARATOR in stored else stored
    prefix = f"{tenant}{_SEPARATOR}"
    return stored[len(prefix) :] if stored.startswith(prefix) else None


def caller_view(message: str) -> str:
    """`message` with the running call's collections named as its tenant knows them (names are quoted)."""
    tenant = current().tenant
    return message if tenant == DEFAULT_TENANT else message.replace(f"'{tenant}{_SEPARATOR}", "'")
