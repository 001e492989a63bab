"""Who is calling and what they may do: roles, the actions they grant, and collection grants.

Transport-free: the gRPC interceptor (server.auth) and every later door ask `authorize` the same question.
"""

from __future__ import annotations

import contextvars
import enum
import fnmatch
from dataclasses import dataclass
from typing import Final

from embedpool.errors import PermissionDenied

__all__ = ["ANONYMOUS", "DEFAULT_TENANT", "Action", "Principal", "Role", "acting", "authorize", "current"]

DEFAULT_TENANT: Final = "default"
"""The tenant of callers without keys, whose namespace holds the collections made before keys existed."""


class Role(enum.IntEnum):
    """Ordered: each role may do everything the ones below it may."""

    READER = 1
    WRITER = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"role must be reader, writer or admin, not {text!r}") from None


class Action(enum.Enum):
    """What a request does."""

    EMBED = "embed"  # vectors only, no collection
    READ = "read"  # Search, GetCollection, ListCollections, model info
    WRITE = "write"  # Embed into a collection, Ingest, DeleteDocuments
    ADMIN = "administer"  # CreateCollection, DropCollection
    MANAGE_KEYS = "manage keys"  # CreateKey, ListKeys, RevokeKey: only with a grant of every collection
    MANAGE_SYNCS = "manage syncs"  # CreateSync ... DropSync: they read the database, so like keys

    @property
    def role(self) -> Role:
        """The least role that may do it."""
        return _LEAST_ROLE[self]


_LEAST_ROLE: dict[Action, Role] = {
    Action.EMBED: Role.READER,
    Action.READ: Role.READER,
    Action.WRITE: Role.WRITER,
    Action.ADMIN: Role.ADMIN,
    Action.MANAGE_KEYS: Role.ADMIN,
    Action.MANAGE_SYNCS: Role.ADMIN,
}


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller. `collections` is a glob over the tenant's collection names ("*": all of them)."""

    tenant: str
    role: Role
    key_id: str = ""
    collections: str = "*"
    tokens_per_s: float | None = None
    docs_per_s: float | None = None

    def may_see(self, collection: str) -> bool:
        return self.collections == "*" or fnmatch.fnmatchcase(collection, self.collections)


ANONYMOUS = Principal(tenant=DEFAULT_TENANT, role=Role.ADMIN)
"""The caller when authentication is off: the default tenant's admin, as the service behaved before keys."""


def authorize(principal: Principal, action: Action, collection: str = "") -> None:
    """PermissionDenied unless `principal`'s role covers `action` and its grant covers `collection`."""
    if principal.role < action.role:
        raise PermissionDenied(
            f"this key's role ({principal.role.label}) may not {action.value}; it needs {action.role.label}"
        )
    if action is Action.MANAGE_KEYS and principal.collections != "*":
        # A key limited to some collections could otherwise make itself a key for all of them.
        raise PermissionDenied("managing keys needs an admin key granted every collection (--collections '*')")
    if action is Action.MANAGE_SYNCS and (principal.collections != "*" or principal.tenant != DEFAULT_TENANT):
        # A sync reads whatever the server's database role can read, whichever collection it fills: the
        # operator's power, not a tenant's (and sync names are not per tenant).
        raise PermissionDenied(
            f"managing syncs needs an admin key of tenant {DEFAULT_TENANT!r} granted every collection"
        )
    if collection and not principal.may_see(collection):
        raise PermissionDenied(f"this key is not granted collection {collection!r}")


_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=ANONYMOUS)


def acting(principal: Principal) -> None:
    """Sets the running call's principal (server.auth does, once it is verified)."""
    _current.set(principal)


def current() -> Principal:
    """The running call's principal: what key management acts as."""
    return _current.get()
