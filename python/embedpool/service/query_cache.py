"""An exact-match cache of query embeddings: the same query text, for the same model and options, is embedded once.

Search by text and small Embed calls (the shape of a query) look their texts up here first; writes (Embed into a
collection, Ingest, syncs) never do, as documents are rarely embedded twice and would only evict the queries.

Entries hold the model's full-size vector: a Matryoshka size is cut from it and re-normalised by the caller, the
same operation as on a freshly embedded vector, so one entry serves every size and returns the same bits. An entry
records the text's token count too, which the caller reports although nothing was embedded (see core.embed).

The bound is in bytes: each entry counts its vector, its text and ENTRY_OVERHEAD for the Python objects around
them; the least recently used entries go first. With `serve --workers N`, each worker has its own cache.

A text missing from the cache while another call is embedding it is not embedded again: the call waits for that
one's flight (`QueryCache.flight`), as many callers sending one popular query at once would otherwise each embed it.
If the call it waits for fails (its own deadline, overload, a cancelled caller), the waiting call embeds the text
itself.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final, NamedTuple

import anyio
import numpy as np
from numpy.typing import NDArray

from embedpool import metrics

__all__ = [
    "ENTRY_OVERHEAD",
    "MAX_CALL_TEXTS",
    "MAX_TEXT_CHARS",
    "CachedQuery",
    "Flight",
    "QueryCache",
    "QueryKey",
    "entry_bytes",
]

MAX_CALL_TEXTS: Final = 8
"""An Embed call of more texts is a batch of documents, not queries: it bypasses the cache."""
MAX_TEXT_CHARS: Final = 2048
"""Longer texts are embedded without the cache: past the models' token limits, and rarely sent twice."""
ENTRY_OVERHEAD: Final = 384
"""Bytes per entry beyond its vector's data and its text: the array object, the key and entry tuples and the ordered
dict's slot and link (about 330 measured with tracemalloc on CPython 3.11), rounded up."""


class QueryKey(NamedTuple):
    model: str
    """The model's name and variant: vectors of two variants differ."""
    prompt: str
    """The instruction prepended to the text ("" until prompts exist): part of what is embedded."""
    truncate: bool
    """Whether over-long texts were cut: with truncate=False they are refused instead, and never cached."""
    text: str


class CachedQuery(NamedTuple):
    vector: NDArray[np.float32]
    """The model's full-size, unit-length vector; read-only, so no caller can change what others will get."""
    tokens: int


class Flight:
    """A text being embedded by one call, which other calls missing the same text wait on."""

    def __init__(self, key: QueryKey) -> None:
        self.key = key
        self.done = anyio.Event()
        self.entry: CachedQuery | None = None
        """Set when the call embedding it succeeded; None once done means it failed."""


class QueryCache:
    """A least-recently-used map of QueryKey to CachedQuery, at most `max_bytes` large (0: off, nothing kept).

    Every method runs without awaiting, so calls on the event loop cannot interleave; a lock makes it safe from
    other threads too."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[QueryKey, CachedQuery] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._flights: dict[QueryKey, Flight] = {}

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def serves(self, texts: Sequence[str]) -> bool:
        """Whether a call embedding `texts` should use the cache (each text has a `key` or not, too)."""
        return self.enabled and len(texts) <= MAX_CALL_TEXTS

    @staticmethod
    def key(model: str, truncate: bool, text: str, prompt: str = "") -> QueryKey | None:
        """The text's key; None for a text too long to cache."""
        return QueryKey(model, prompt, truncate, text) if len(text) <= MAX_TEXT_CHARS else None

    def get(self, key: QueryKey) -> CachedQuery | None:
        """The entry, now the most recently used; counted as a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                metrics.QUERY_CACHE_MISSES.inc()
                return None
            self._entries.move_to_end(key)
        metrics.QUERY_CACHE_HITS.inc()
        return entry

    def flight(self, key: QueryKey) -> tuple[Flight, bool]:
        """The flight of `key`, and whether the caller leads it: a leader embeds the text and must `land` the
        flight, success or not; the others wait on it (counted as joined). On the event loop only."""
        if (flight := self._flights.get(key)) is not None:
            metrics.QUERY_CACHE_JOINED.inc()
            return flight, False
        flight = self._flights[key] = Flight(key)
        return flight, True

    def land(self, flight: Flight, entry: CachedQuery | None) -> None:
        """Ends a flight its leader began: `entry` is what it embedded (None: it failed, and those waiting embed
        the text themselves)."""
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        flight.entry = entry
        flight.done.set()

    def put(self, key: QueryKey, vector: NDArray[np.float32], tokens: int) -> None:
        """Keeps a copy of `vector` (a row of a batch would keep the whole batch alive), evicting the least recently
        used entries to stay within the bound. An entry larger than the whole bound is not kept."""
        size = entry_bytes(key, vector)
        if size > self.max_bytes:
            return
        kept = np.array(vector, dtype=np.float32, copy=True)
        kept.flags.writeable = False
        with self._lock:
            before_bytes, before_count = self._bytes, len(self._entries)
            if (old := self._entries.pop(key, None)) is not None:  # two callers embedded it at once
                self._bytes -= entry_bytes(key, old.vector)
            self._entries[key] = CachedQuery(kept, tokens)
            self._bytes += size
            while self._bytes > self.max_bytes:
                gone_key, gone = self._entries.popitem(last=False)
                self._bytes -= entry_bytes(gone_key, gone.vector)
            added_bytes, added = self._bytes - before_bytes, len(self._entries) - before_count
        # Deltas, not set(): a test process runs several servers, each with its own cache, and the gauges add them.
        metrics.QUERY_CACHE_BYTES.inc(added_bytes)
        metrics.QUERY_CACHE_ENTRIES.inc(added)


def entry_bytes(key: QueryKey, vector: NDArray[np.float32]) -> int:
    """What an entry counts against the bound. The model label is one string shared by every key, and an empty
    prompt is Python's one empty string, so neither counts; the text's own object does (header included)."""
    prompt = sys.getsizeof(key.prompt) if key.prompt else 0
    return ENTRY_OVERHEAD + vector.nbytes + sys.getsizeof(key.text) + prompt
