"""Usage accounting per tenant: what each call used, summed in memory, added to the tenant_usage table every
few seconds (per hour, per tenant: what billing reads) and counted in Prometheus under a bounded label."""

from __future__ import annotations

import contextvars
import dataclasses
import logging
from dataclasses import dataclass
from typing import Final

import anyio

from embedpool import metrics
from embedpool.errors import EmbedpoolError
from embedpool.store import Store
from embedpool.store import usage as usage_rows

__all__ = ["Usage", "UsageBook", "meter", "metering"]

_log = logging.getLogger("embedpool.usage")
_FLUSH_S: Final = 5.0
_MAX_LABELS: Final = 64
_OTHER: Final = "other"


@dataclass(slots=True)
class Usage:
    requests: int = 0
    tokens: int = 0
    documents: int = 0
    searches: int = 0
    bytes_out: int = 0

    def add(self, other: Usage) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


_current: contextvars.ContextVar[Usage | None] = contextvars.ContextVar("usage", default=None)


def meter() -> Usage:
    """The running call's usage, for the handlers to add to (a throwaway one outside a metered call)."""
    return _current.get() or Usage()


def metering(usage: Usage) -> contextvars.Token[Usage | None]:
    return _current.set(usage)


class UsageBook:
    def __init__(self, store: Store | None) -> None:
        self._store = store
        self._pending: dict[str, Usage] = {}
        self._labels: set[str] = set()

    def _label(self, tenant: str) -> str:
        if tenant in self._labels:
            return tenant
        if len(self._labels) < _MAX_LABELS:
            self._labels.add(tenant)
            return tenant
        return _OTHER

    def add(self, tenant: str, usage: Usage) -> None:
        self._pending.setdefault(tenant, Usage()).add(usage)
        label = self._label(tenant)
        for counter, value in (
            (metrics.TENANT_REQUESTS, usage.requests),
            (metrics.TENANT_TOKENS, usage.tokens),
            (metrics.TENANT_DOCUMENTS, usage.documents),
            (metrics.TENANT_SEARCHES, usage.searches),
            (metrics.TENANT_BYTES_OUT, usage.bytes_out),
        ):
            if value:
                counter.labels(label).inc(value)

    async def flush(self) -> None:
        """Adds what was used since the last flush to tenant_usage; kept for the next one when that fails."""
        pending, self._pending = self._pending, {}
        if not pending or self._store is None:
            return
        counts = [(t, u.requests, u.tokens, u.documents, u.searches, u.bytes_out) for t, u in pending.items()]
        try:
            async with self._store.connection() as conn:
                await usage_rows.add(conn, counts)
        except EmbedpoolError as e:
            _log.warning("could not record usage (kept for the next try): %s", e)
            for tenant, usage in pending.items():
                self._pending.setdefault(tenant, Usage()).add(usage)

    async def run(self) -> None:
        """Flushes every few seconds until cancelled, then once more."""
        try:
            while True:
                await anyio.sleep(_FLUSH_S)
                await self.flush()
        finally:
            with anyio.CancelScope(shield=True):
                await self.flush()
