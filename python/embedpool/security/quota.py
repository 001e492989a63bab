"""Per-key rate limits: token buckets for documents/s and tokens/s, kept by each server for its own calls.

Documents are known before a call and are taken up front; tokens are only known once the text is tokenized,
so they are charged after the call and the next call waits until the debt is paid off. A bucket holds one
second of its rate; a call larger than that is let through when the bucket is full (and leaves it in debt),
so no request size is refused forever while the average rate still holds. With N replicas behind a load
balancer a key gets up to N times its rate: set the rate per replica.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from embedpool import metrics
from embedpool.errors import Overloaded
from embedpool.security.principal import Principal

__all__ = ["Quotas", "TokenBucket"]

_BURST_S = 1.0


@dataclass(slots=True)
class TokenBucket:
    rate: float
    level: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    @property
    def capacity(self) -> float:
        return self.rate * _BURST_S

    def _refill(self, now: float) -> None:
        if now > self.stamp:  # a `now` read before the bucket was made is earlier than its stamp
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, n: float, now: float) -> float:
        """Takes `n` and returns 0, or takes nothing and returns the seconds until it could."""
        self._refill(now)
        needed = min(n, self.capacity)
        if self.level >= needed - 1e-9 * self.capacity:  # who waited as told is not refused by a rounding error
            self.level -= n
            return 0.0
        return (needed - self.level) / self.rate

    def charge(self, n: float, now: float) -> None:
        self._refill(now)
        self.level -= n


class Quotas:
    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def _bucket(self, key_id: str, kind: str, rate: float) -> TokenBucket:
        bucket = self._buckets.get((key_id, kind))
        if bucket is None or bucket.rate != rate:  # a key's rates never change; a new bucket is safe anyway
            bucket = self._buckets[(key_id, kind)] = TokenBucket(rate)
        return bucket

    def delay(self, principal: Principal, documents: int) -> float:
        """Admits a call of `documents` (0 when it is done, or the seconds to wait before it would be)."""
        now = time.monotonic()
        wait = 0.0
        if principal.tokens_per_s is not None:
            wait = self._bucket(principal.key_id, "tokens", principal.tokens_per_s).take(0, now)
        if wait == 0.0 and principal.docs_per_s is not None and documents:
            wait = self._bucket(principal.key_id, "documents", principal.docs_per_s).take(documents, now)
        return wait

    def admit(self, principal: Principal, documents: int) -> None:
        """Overloaded with the seconds to wait (RetryInfo) when the key's rate is spent."""
        wait = math.ceil(self.delay(principal, documents) * 1000) / 1000  # whole milliseconds, rounded up
        if wait > 0.0:
            metrics.QUOTA_REFUSALS.inc()
            raise Overloaded(f"this key's rate limit is reached; retry in {wait:.3f} s", retry_after=wait)

    def charge_tokens(self, principal: Principal, tokens: int) -> None:
        if principal.tokens_per_s is not None and tokens:
            self._bucket(principal.key_id, "tokens", principal.tokens_per_s).charge(tokens, time.monotonic())
