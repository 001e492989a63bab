"""The server's own view of a step, from its Prometheus /metrics: batches cut, documents per batch, padding
efficiency, engine time. Counters are read before and after each step; the step's figures are the differences
(summed over replicas when several /metrics URLs are given)."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from embedpool import metrics
from embedpool.benchmark.credentials import Credentials

__all__ = ["CACHE_HITS", "Scraper", "server_figures"]


def _name(metric: Any) -> str:
    return str(metric.describe()[0].name)


# Sample names, from the metrics' own definitions: a histogram's _sum and _count, a counter's _total.
BATCHES = _name(metrics.BATCH_INPUTS) + "_count"
BATCH_DOCS = _name(metrics.BATCH_INPUTS) + "_sum"
PADDED_TOKENS = _name(metrics.BATCH_TOKENS) + "_sum"
EFFICIENCY_SUM = _name(metrics.PADDING_EFFICIENCY) + "_sum"
INFERENCE_SECONDS = _name(metrics.INFERENCE_SECONDS) + "_sum"
TOKENS = _name(metrics.TOKENS) + "_total"
DOCUMENTS = _name(metrics.DOCUMENTS) + "_total"
REJECTIONS = _name(metrics.REJECTIONS) + "_total"
CACHE_HITS = _name(metrics.QUERY_CACHE_HITS) + "_total"
_WANTED = {
    BATCHES,
    BATCH_DOCS,
    PADDED_TOKENS,
    EFFICIENCY_SUM,
    INFERENCE_SECONDS,
    TOKENS,
    DOCUMENTS,
    REJECTIONS,
    CACHE_HITS,
}

Snapshot = dict[str, float]


class Scraper:
    """Reads the embedpool counters from one or more /metrics URLs."""

    def __init__(self, urls: list[str], credentials: Credentials, *, timeout: float = 10.0) -> None:
        self.urls = urls
        self._http = [credentials.http_client(url, connections=1, timeout=timeout) for url in urls]

    async def snapshot(self) -> Snapshot:
        """The wanted counters, summed over the URLs. httpx.HTTPError when one does not answer."""
        total: Snapshot = dict.fromkeys(_WANTED, 0.0)
        for url, http in zip(self.urls, self._http, strict=True):
            reply = await http.get(url)
            reply.raise_for_status()
            for family in text_string_to_metric_families(reply.text):
                for sample in family.samples:
                    if sample.name in _WANTED:  # summed over the models' labels
                        total[sample.name] += float(sample.value)
        return total

    async def aclose(self) -> None:
        for http in self._http:
            await http.aclose()


def server_figures(before: Snapshot, after: Snapshot, elapsed: float) -> dict[str, Any]:
    """A step's server-side figures from the counters around it."""
    d = {name: after[name] - before[name] for name in _WANTED}
    batches = d[BATCHES]
    return {
        "documents": int(d[DOCUMENTS]),
        "tokens": int(d[TOKENS]),
        "batches": int(batches),
        "batch_size_mean": d[BATCH_DOCS] / batches if batches else None,
        # Token-weighted (real tokens over padded tokens of every batch), and the mean of the batches' own ratios.
        "padding_efficiency": d[TOKENS] / d[PADDED_TOKENS] if d[PADDED_TOKENS] else None,
        "padding_efficiency_batch_mean": d[EFFICIENCY_SUM] / batches if batches else None,
        "engine_busy": d[INFERENCE_SECONDS] / elapsed if elapsed > 0 else None,
        "rejections": int(d[REJECTIONS]),
    }
