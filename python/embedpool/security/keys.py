"""API keys as strings: `ep_<id>_<secret>`. The id (12 hex digits) is public, shown by `keys list` and in
the audit log; the secret (256 random bits) is shown once, at creation, and stored only as its SHA-256."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Final

__all__ = ["ParsedKey", "generate", "is_key_id", "matches", "parse", "secret_hash"]

_PREFIX: Final = "ep_"
_ID: Final = "[0-9a-f]{12}"
_FORMAT: Final = re.compile(rf"ep_({_ID})_([A-Za-z0-9_-]{{43}})")


@dataclass(frozen=True, slots=True)
class ParsedKey:
    id: str
    secret: str


def generate() -> tuple[str, ParsedKey]:
    """A new key: (the full string to hand out once, its parts)."""
    parsed = ParsedKey(id=secrets.token_hex(6), secret=secrets.token_urlsafe(32))
    return f"{_PREFIX}{parsed.id}_{parsed.secret}", parsed


def parse(text: str) -> ParsedKey | None:
    match = _FORMAT.fullmatch(text)
    return ParsedKey(match[1], match[2]) if match else None


def is_key_id(text: str) -> bool:
    return re.fullmatch(_ID, text) is not None


def secret_hash(secret: str) -> bytes:
    # The secret is uniformly random, so a fast hash resists guessing as well as a slow one would.
    return hashlib.sha256(secret.encode()).digest()


def matches(parsed: ParsedKey, stored_hash: bytes) -> bool:
    return hmac.compare_digest(secret_hash(parsed.secret), stored_hash)
