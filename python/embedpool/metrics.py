"""Prometheus metrics, defined once. The pool and the server record into them; /metrics exposes them."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

RPC_LATENCY = Histogram(
    "embedpool_rpc_duration_seconds",
    "RPC latency by method and status code",
    ["method", "code"],
    buckets=_LATENCY_BUCKETS,
)
HTTP_LATENCY = Histogram(
    "embedpool_http_request_duration_seconds",
    "HTTP request latency by route (its template, or 'unmatched') and status",
    ["route", "status"],
    buckets=_LATENCY_BUCKETS,
)
# multiprocess_mode: how `serve --workers N` merges a gauge over its live workers (ignored in one process).
QUEUE_INPUTS = Gauge("embedpool_queue_inputs", "documents waiting for a batch", ["model"], multiprocess_mode="livesum")
QUEUE_TOKENS = Gauge("embedpool_queue_tokens", "tokens waiting for a batch", ["model"], multiprocess_mode="livesum")
# By priority class (pool.priority: "interactive" or "bulk"): whether interactive calls really go ahead under bulk load.
QUEUE_CLASS_INPUTS = Gauge(
    "embedpool_queue_class_inputs",
    "documents waiting for a batch, by priority class",
    ["model", "priority"],
    multiprocess_mode="livesum",
)
QUEUE_WAIT_SECONDS = Histogram(
    "embedpool_queue_wait_seconds",
    "time from a call's documents being queued to the engine starting the first batch holding one, by priority class",
    ["model", "priority"],
    buckets=_LATENCY_BUCKETS,
)
PERMITS_IN_USE = Gauge(
    "embedpool_permits_in_use", "documents admitted and not yet answered", ["model"], multiprocess_mode="livesum"
)
# The budget permits_in_use counts against: their ratio is the saturation the autoscaler and alerts read.
PERMITS_CAPACITY = Gauge(
    "embedpool_permits_capacity", "documents that may be admitted at once", ["model"], multiprocess_mode="livesum"
)
# 1 while the replica takes traffic (model warm, database reachable, not draining): what a balancer's check sees.
# With workers: 1 while any of them is (the port is served).
READY = Gauge("embedpool_ready", "1 while this replica is ready for traffic", multiprocess_mode="livemax")
REJECTIONS = Counter("embedpool_rejections_total", "requests refused for lack of capacity", ["model"])
BATCH_INPUTS = Histogram(
    "embedpool_batch_inputs", "documents per batch", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
)
BATCH_TOKENS = Histogram(
    "embedpool_batch_padded_tokens",
    "padded tokens per batch (longest x count)",
    ["model"],
    buckets=(64, 256, 1024, 4096, 8192, 16384, 32768, 65536, 131072),
)
PADDING_EFFICIENCY = Histogram(
    "embedpool_batch_padding_efficiency",
    "real tokens / padded tokens per batch",
    ["model"],
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
)
INFERENCE_SECONDS = Histogram(
    "embedpool_inference_duration_seconds", "time the engine spent on one batch", ["model"], buckets=_LATENCY_BUCKETS
)
TOKENS = Counter("embedpool_tokens_total", "real (unpadded) tokens embedded", ["model"])
DOCUMENTS = Counter("embedpool_documents_total", "documents embedded", ["model"])
BATCH_FAILURES = Counter(
    "embedpool_batch_failures_total",
    "batches with a document the engine failed on, even after splitting",
    ["model"],
)
INFERENCE_SPLITS = Counter(
    "embedpool_inference_splits_total",
    "failed engine calls retried as two halves (a poison document, out of memory)",
    ["model"],
)
SESSIONS_IN_ROTATION = Gauge(
    "embedpool_sessions_in_rotation",
    "inference sessions serving batches (one that keeps failing is taken out)",
    ["model"],
    multiprocess_mode="livesum",
)
STORE_SECONDS = Histogram(
    "embedpool_store_write_duration_seconds", "time to store one batch (one transaction)", buckets=_LATENCY_BUCKETS
)
STORED_DOCUMENTS = Counter(
    "embedpool_store_documents_total",
    "documents written to collections, by outcome (unchanged: same content hash, neither embedded nor written)",
    ["outcome"],
)
# The query-embedding cache (service.query_cache): lookups by Search by text and small Embed calls, per text.
QUERY_CACHE_HITS = Counter("embedpool_query_cache_hits_total", "query texts whose embedding the cache held")
QUERY_CACHE_MISSES = Counter("embedpool_query_cache_misses_total", "query texts looked up and embedded")
QUERY_CACHE_JOINED = Counter(
    "embedpool_query_cache_joined_total",
    "query texts missing from the cache that waited for another call embedding the same text (counted as misses too)",
)
QUERY_CACHE_BYTES = Gauge(
    "embedpool_query_cache_bytes", "bytes the query cache holds (vectors, texts, overhead)", multiprocess_mode="livesum"
)
QUERY_CACHE_ENTRIES = Gauge(
    "embedpool_query_cache_entries", "query embeddings the cache holds", multiprocess_mode="livesum"
)
AUTH_FAILURES = Counter(
    "embedpool_auth_failures_total", "requests refused for their credential, by gRPC status", ["code"]
)
QUOTA_REFUSALS = Counter("embedpool_quota_refusals_total", "requests refused because their key's rate was spent")
# Per tenant (label bounded by security.usage: the first tenants seen keep their name, the rest are "other").
TENANT_REQUESTS = Counter("embedpool_tenant_requests_total", "RPCs served, by tenant", ["tenant"])
TENANT_TOKENS = Counter("embedpool_tenant_tokens_total", "tokens embedded, by tenant", ["tenant"])
TENANT_DOCUMENTS = Counter("embedpool_tenant_documents_total", "documents stored or deleted, by tenant", ["tenant"])
TENANT_SEARCHES = Counter("embedpool_tenant_searches_total", "searches, by tenant", ["tenant"])
TENANT_BYTES_OUT = Counter("embedpool_tenant_bytes_out_total", "response bytes sent, by tenant", ["tenant"])
# Per sync (label: the sync's name; syncs are few and made by admins). The gauges read the shared queue, so every
# replica reports the same value: merged with max.
SYNC_BACKLOG = Gauge(
    "embedpool_sync_backlog_rows", "rows with a pending change, by sync", ["sync"], multiprocess_mode="livemax"
)
SYNC_LAG = Gauge(
    "embedpool_sync_lag_seconds",
    "age of the oldest pending change, by sync (0: caught up)",
    ["sync"],
    multiprocess_mode="livemax",
)
SYNC_DEAD_ROWS = Gauge(
    "embedpool_sync_dead_rows",
    "rows dead-lettered after their last attempt, by sync",
    ["sync"],
    multiprocess_mode="livemax",
)
SYNC_ROWS = Counter("embedpool_sync_rows_total", "rows stored in or removed from their collection, by sync", ["sync"])
SYNC_FAILURES = Counter("embedpool_sync_failures_total", "failed attempts at a row, by sync", ["sync"])
SYNC_DEAD_LETTERED = Counter("embedpool_sync_dead_lettered_total", "rows dead-lettered, by sync", ["sync"])


@dataclass(frozen=True)
class PoolMetrics:
    """The pool's metrics for one model (label `model`: the models a server serves, a handful), bound once."""

    queue_inputs: Gauge
    queue_tokens: Gauge
    permits_in_use: Gauge
    permits_capacity: Gauge
    rejections: Counter
    batch_inputs: Histogram
    batch_tokens: Histogram
    padding_efficiency: Histogram
    inference_seconds: Histogram
    tokens: Counter
    documents: Counter
    batch_failures: Counter
    inference_splits: Counter
    sessions_in_rotation: Gauge
    model: str
    _waits: dict[str, Histogram] = field(default_factory=dict, compare=False)

    def queue_class_inputs(self, priority: str) -> Gauge:
        return QUEUE_CLASS_INPUTS.labels(self.model, priority)

    def queue_wait_seconds(self, priority: str) -> Histogram:
        """Bound once per class: `labels()` costs more than the observation (it is taken once per batch)."""
        wait = self._waits.get(priority)
        if wait is None:
            wait = self._waits[priority] = QUEUE_WAIT_SECONDS.labels(self.model, priority)
        return wait


def pool_metrics(model: str) -> PoolMetrics:
    return PoolMetrics(
        QUEUE_INPUTS.labels(model),
        QUEUE_TOKENS.labels(model),
        PERMITS_IN_USE.labels(model),
        PERMITS_CAPACITY.labels(model),
        REJECTIONS.labels(model),
        BATCH_INPUTS.labels(model),
        BATCH_TOKENS.labels(model),
        PADDING_EFFICIENCY.labels(model),
        INFERENCE_SECONDS.labels(model),
        TOKENS.labels(model),
        DOCUMENTS.labels(model),
        BATCH_FAILURES.labels(model),
        INFERENCE_SPLITS.labels(model),
        SESSIONS_IN_ROTATION.labels(model),
        model,
    )
