"""Client-side round robin over the servers of a replica set that has no load balancer in front.

A target that answered UNAVAILABLE (nothing listening, a server draining or gone) is passed over for a short
cool-down, so that calls go to the others at once instead of each paying a failed attempt; when every target is
cooling down, the one that has cooled longest is tried (a replica set that is down entirely still gets attempts,
paced by the retry backoff).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from embedpool.errors import InvalidArgument

__all__ = ["Targets", "parse_targets"]


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """One "host:port", several in a sequence, or several in one string separated by commas."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    parsed = [t.strip() for t in items if t.strip()]
    if not parsed:
        raise InvalidArgument("targets: give at least one host:port")
    return parsed


class Targets:
    """Which target the next attempt goes to. Thread-safe; never held across a call, so usable from asyncio."""

    def __init__(self, addresses: Sequence[str], cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.addresses = list(addresses)
        self._cooldown = cooldown
        self._clock = clock
        self._until = [0.0] * len(self.addresses)  # cooling down until (clock time); 0: ready
        self._next = 0
        self._lock = threading.Lock()

    def pick(self) -> int:
        """The next ready target in turn, else the one whose cool-down ends first."""
        with self._lock:
            now = self._clock()
            n = len(self.addresses)
            for step in range(n):
                index = (self._next + step) % n
                if self._until[index] <= now:
                    self._next = index + 1
                    return index
            return min(range(n), key=self._until.__getitem__)

    def unavailable(self, index: int) -> bool:
        """Starts `index`'s cool-down; True when another target is ready to take the call now."""
        with self._lock:
            now = self._clock()
            self._until[index] = now + self._cooldown
            return any(until <= now for until in self._until)

    def answered(self, index: int) -> None:
        """A call to `index` succeeded: it is ready again, whatever its cool-down said."""
        if self._until[index]:
            with self._lock:
                self._until[index] = 0.0
