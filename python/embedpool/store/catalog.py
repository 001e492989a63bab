"""Collection rows by name, cached while a LISTEN connection hears of every change (store.notified).

Migration 0004 announces each insert, update or delete of a `collections` row. A stale entry in the window
between a commit and its notification fails loudly downstream: writes look the row up again under a lock,
and a partition's name holds the collection's never-reused id (UndefinedTable).
"""

from __future__ import annotations

from typing import Final

from embedpool.store.notified import NotifiedCache
from embedpool.store.records import CollectionInfo

__all__ = ["CHANNEL", "CollectionCache"]

CHANNEL: Final = "embedpool_collections"


class CollectionCache(NotifiedCache[CollectionInfo]):
    def __init__(self) -> None:
        super().__init__(CHANNEL)

    def get(self, name: str) -> CollectionInfo | None:
        return self.lookup(name)[1]
