"""When a failed call is tried again: the retry policy both clients share, free of I/O so that the sync and the
async client differ only in how they wait.

RESOURCE_EXHAUSTED and UNAVAILABLE are retried, with exponential backoff and full jitter, after at least the
server's google.rpc.RetryInfo delay, and never past the caller's deadline: when the next attempt could not start
before it, the last failure is raised at once instead of sleeping towards a certain timeout. Every embedpool RPC
may be repeated: reads have no effect, and writes are idempotent on the server (an upsert keyed by id and
content hash leaves one row per id however often it arrives), so a retried Embed into a collection or Ingest
batch cannot duplicate documents.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.rpc import error_details_pb2, status_pb2

from embedpool.client.targets import Targets
from embedpool.errors import EmbedpoolError, Overloaded
from embedpool.status import error_for_grpc

__all__ = ["RETRYABLE", "Attempts", "Deadline", "Failure", "RetryPolicy"]

log = logging.getLogger("embedpool.client")

RETRYABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_DETAILS_KEY: Final = "grpc-status-details-bin"
# How grpc-core words a stream cut on the way: a load balancer whose replica died mid-call resets the stream
# (nginx: RST_STREAM INTERNAL_ERROR) or ends it without trailers (HAProxy). grpc reports INTERNAL or UNKNOWN, but
# no server said so (an embedpool INTERNAL names its request id instead), and any embedpool RPC may be repeated:
# so it is the replica being unavailable, and retried as UNAVAILABLE.
_STREAM_CUT: Final = re.compile(r"^Stream removed|RST_STREAM|END_STREAM flag received")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 8
    """Attempts per call, the first one and immediate fail-overs included."""
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    cooldown: float = 2.0
    """Seconds a target that answered UNAVAILABLE is passed over while another one is ready."""

    def backoff(self, retry: int, draw: Callable[[], float] = random.random) -> float:
        """Full jitter: uniform in [0, the capped exponential bound) before retry number `retry` (1, 2, ...);
        spreads the retries of many clients that failed together."""
        return draw() * min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt, as the status the server (or grpc, for a connection) ended it with."""

    code: grpc.StatusCode
    message: str
    retry_after: float | None = None
    """The server's google.rpc.RetryInfo delay, when it sent one."""

    @classmethod
    def of(cls, code: grpc.StatusCode | None, details: str | None, trailing: Iterable[Any] | None) -> Failure:
        """From a call's status; `trailing`: its trailing metadata, (key, value) pairs."""
        code, details = code or grpc.StatusCode.UNKNOWN, details or ""
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and _STREAM_CUT.search(details):
            code = grpc.StatusCode.UNAVAILABLE
        return cls(code, details, _retry_after(trailing or ()))

    def error(self, note: str = "") -> EmbedpoolError:
        message = f"{self.message} ({note})" if note else self.message
        error = error_for_grpc(self.code, message)
        if isinstance(error, Overloaded):
            error.retry_after = self.retry_after
        return error


def _retry_after(trailing: Iterable[Any]) -> float | None:
    for key, value in trailing:
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


class Deadline:
    """The caller's deadline for a whole method call: its split calls, retries and waits together."""

    def __init__(self, timeout: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._clock = clock
        self._at = None if timeout is None else clock() + timeout

    def remaining(self) -> float | None:
        """Seconds left (at least 0), None without a deadline: what each attempt passes to grpc as its timeout."""
        return None if self._at is None else max(0.0, self._at - self._clock())


class Attempts:
    """The attempts of one call over the targets: which target each goes to, which failures are tried again,
    after how long, and when to give up."""

    def __init__(self, policy: RetryPolicy, deadline: Deadline, method: str, targets: Targets) -> None:
        self.policy = policy
        self.deadline = deadline
        self.method = method
        self.targets = targets
        self.count = 0
        self._retries = 0
        self._index = 0

    def target(self) -> int:
        """The target of the next attempt."""
        self._index = self.targets.pick()
        return self._index

    def answered(self) -> None:
        self.targets.answered(self._index)

    def progressed(self) -> None:
        """The call got somewhere before it failed (a stream had batches acknowledged): a fresh budget."""
        self.count = self._retries = 0

    def failed(self, failure: Failure) -> float:
        """Seconds to wait before the next attempt: 0 to go at once to another target when the failure was
        UNAVAILABLE and another one is ready. Raises the failure's domain error instead when it is not retried:
        its status is not retryable, the attempts are used up, or the next one would start past the deadline."""
        self.count += 1
        if failure.code not in RETRYABLE:
            raise failure.error()
        if self.count >= self.policy.max_attempts:
            raise failure.error(f"gave up after {self.count} attempts")
        delay = 0.0
        if not (failure.code == grpc.StatusCode.UNAVAILABLE and self.targets.unavailable(self._index)):
            self._retries += 1
            delay = max(self.policy.backoff(self._retries), failure.retry_after or 0.0)
        remaining = self.deadline.remaining()
        if remaining is not None and delay >= remaining:
            raise failure.error(f"gave up after {self.count} attempts: the next would start past the deadline")
        log.debug(
            "%s: %s from %s, attempt %d; retrying in %.3f s",
            self.method,
            failure.code.name,
            self.targets.addresses[self._index],
            self.count,
            delay,
        )
        return delay
