"""The query cache on real servers: a repeated Search or small Embed is a hit with the same answer, costs no embedded
tokens but reports its token count, tokenizer errors still surface, the byte bound holds, and 0 turns it off.

Two servers, one with a small cache (a few dozen entries, so the bound is reached) and one without; both take
Matryoshka size 128. /metrics is process-wide and the test process runs other servers too: counts are read as
differences, over calls made one at a time."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from prometheus_client.parser import text_string_to_metric_families

from embedpool.server.app import Running
from embedpool.service.query_cache import ENTRY_OVERHEAD, MAX_CALL_TEXTS
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import SettingsFactory, serving

BENCH = Path(__file__).resolve().parents[2] / "bench" / "query_cache.py"
DIM = 384
BOUND_ENTRIES = 12
BOUND = BOUND_ENTRIES * (ENTRY_OVERHEAD + 4 * DIM + 150)  # entries of texts up to about 100 characters
HITS, MISSES = "embedpool_query_cache_hits_total", "embedpool_query_cache_misses_total"
JOINED = "embedpool_query_cache_joined_total"
BYTES, ENTRIES, TOKENS = "embedpool_query_cache_bytes", "embedpool_query_cache_entries", "embedpool_tokens_total"
LONG = "word " * 300  # 302 tokens: refused with truncate=False; short enough to be cached when truncated


class Server:
    def __init__(self, running: Running) -> None:
        self.running = running
        self.channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        self.stub = pb_grpc.EmbedderStub(self.channel)
        self.collection = f"qc_{uuid.uuid4().hex[:8]}"
        self.stub.CreateCollection(pb.CreateCollectionRequest(name=self.collection))
        documents = [pb.Document(id=f"d{i}", text=f"document {i} is about topic {i % 5}") for i in range(30)]
        self.stub.Embed(pb.EmbedRequest(collection=self.collection, documents=documents), timeout=60)
        self.others_bytes = metrics(running)[BYTES]  # other servers' caches in this process (this one is empty)

    def embed(self, texts: list[str], **options: Any) -> pb.EmbedResponse:
        request = pb.EmbedRequest(documents=[pb.Document(text=t) for t in texts], **options)
        reply: pb.EmbedResponse = self.stub.Embed(request, timeout=60)
        return reply

    def search(self, text: str) -> list[tuple[str, float]]:
        reply = self.stub.Search(pb.SearchRequest(collection=self.collection, text=text, k=5), timeout=60)
        return [(hit.id, hit.score) for hit in reply.hits]


def metrics(running: Running) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).text
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:  # summed over labels (the pool's metrics carry the model's)
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def changes(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in (HITS, MISSES, TOKENS, BYTES, ENTRIES)}


def vectors(reply: pb.EmbedResponse) -> NDArray[np.float32]:
    return np.stack([np.frombuffer(v, dtype="<f4") for v in reply.vectors])


def _server(make_settings: SettingsFactory, tmp: Path, database: Running, cache_bytes: int) -> Iterator[Server]:
    """A server with its own cache and the session server's database (no second Postgres to start)."""
    settings = make_settings(
        tmp, matryoshka_dims=(128,), query_cache_bytes=cache_bytes, database_url=database.database_url
    )
    with serving(settings) as running:
        server = Server(running)
        yield server
        server.channel.close()


@pytest.fixture(scope="module")
def cached(
    tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory, server: Running
) -> Iterator[Server]:
    yield from _server(make_settings, tmp_path_factory.mktemp("qcache-on"), server, BOUND)


@pytest.fixture(scope="module")
def uncached(
    tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory, server: Running
) -> Iterator[Server]:
    yield from _server(make_settings, tmp_path_factory.mktemp("qcache-off"), server, 0)


def test_the_same_search_twice_is_a_miss_then_a_hit_with_the_same_hits(cached: Server) -> None:
    query = f"which documents are about topic 3? {uuid.uuid4().hex}"
    before = metrics(cached.running)
    first = cached.search(query)
    middle = metrics(cached.running)
    second = cached.search(query)
    after = metrics(cached.running)
    assert changes(before, middle)[MISSES] == 1 and changes(before, middle)[HITS] == 0
    assert changes(middle, after)[HITS] == 1 and changes(middle, after)[MISSES] == 0
    assert changes(middle, after)[TOKENS] == 0  # nothing embedded for the hit
    assert first == second and len(first) == 5


def test_one_query_sent_by_many_callers_at_once_is_embedded_once(cached: Server) -> None:
    query = f"the one popular query of the hour {uuid.uuid4().hex}"
    callers = 12
    ready = threading.Barrier(callers)

    def search(_: int) -> list[tuple[str, float]]:
        ready.wait(timeout=30)
        return cached.search(query)

    before = metrics(cached.running)
    with ThreadPoolExecutor(callers) as threads:
        results = list(threads.map(search, range(callers)))
    after = metrics(cached.running)
    looked_up = {name: after[name] - before[name] for name in (HITS, MISSES, JOINED, TOKENS)}
    tokens = cached.embed([query], skip_vectors=True).token_counts[0]
    assert looked_up[TOKENS] == tokens, looked_up  # embedded once
    assert looked_up[HITS] + looked_up[MISSES] == callers, looked_up
    # Every miss but the first waited for it; the callers that came after it landed found it cached.
    assert looked_up[JOINED] == looked_up[MISSES] - 1, looked_up
    assert all(result == results[0] for result in results) and len(results[0]) == 5


def test_an_embed_embeds_only_the_texts_the_cache_lacks_and_reports_every_token_count(cached: Server) -> None:
    tag = uuid.uuid4().hex
    alpha, beta, gamma = (f"{word} query {tag}" for word in ("alpha", "beta", "gamma"))
    first = cached.embed([alpha, beta])
    before = metrics(cached.running)
    second = cached.embed([beta, gamma, alpha])
    change = changes(before, metrics(cached.running))
    assert (change[HITS], change[MISSES]) == (2, 1)
    only_gamma = cached.embed([gamma], skip_vectors=True).token_counts[0]
    assert change[TOKENS] == only_gamma  # the hits cost no embedded tokens...
    assert list(second.token_counts) == [first.token_counts[1], only_gamma, first.token_counts[0]]  # ...but report
    np.testing.assert_array_equal(vectors(second)[[0, 2]], vectors(first)[[1, 0]])


def test_a_matryoshka_size_is_cut_from_the_cached_vector(cached: Server, uncached: Server) -> None:
    text = f"a query asked at two sizes {uuid.uuid4().hex}"
    full = vectors(cached.embed([text]))
    before = metrics(cached.running)
    short = vectors(cached.embed([text], dimensions=128))
    assert changes(before, metrics(cached.running))[HITS] == 1
    np.testing.assert_allclose(short, vectors(uncached.embed([text], dimensions=128)), atol=1e-6)
    np.testing.assert_allclose(short, full[:, :128] / np.linalg.norm(full[:, :128]), rtol=1e-6)


def test_tokenizer_errors_surface_for_texts_not_cached(cached: Server) -> None:
    short = f"short {uuid.uuid4().hex}"
    cached.embed([short], truncate=False)
    cached.embed([LONG])  # cached truncated: a different key from the same text refused untruncated
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as refused:
            cached.embed([short, LONG], truncate=False)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (refused.value.details() or "").startswith("documents[1].text: ")
    assert cached.embed([LONG]).token_counts[0] == 256


def test_the_openai_route_uses_the_cache(cached: Server) -> None:
    text = f"asked over http {uuid.uuid4().hex}"
    base_url = f"http://127.0.0.1:{cached.running.http_port}/v1"
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as client:
        first = client.embeddings.create(input=text, model="all-MiniLM-L6-v2", encoding_format="float")
        before = metrics(cached.running)
        second = client.embeddings.create(input=text, model="all-MiniLM-L6-v2", encoding_format="float")
    change = changes(before, metrics(cached.running))
    assert (change[HITS], change[MISSES], change[TOKENS]) == (1, 0, 0)
    assert second.usage.prompt_tokens == first.usage.prompt_tokens > 0
    assert second.data[0].embedding == first.data[0].embedding


def test_with_the_cache_off_nothing_is_looked_up_or_kept(uncached: Server) -> None:
    text = f"asked twice of a server without a cache {uuid.uuid4().hex}"
    before = metrics(uncached.running)
    assert uncached.search(text) == uncached.search(text)
    first, second = uncached.embed([text]), uncached.embed([text])
    change = changes(before, metrics(uncached.running))
    assert change[HITS] == change[MISSES] == change[BYTES] == change[ENTRIES] == 0
    assert change[TOKENS] == 4 * first.token_counts[0]  # every call embedded its text
    np.testing.assert_allclose(vectors(first), vectors(second), atol=1e-6)


def test_the_byte_bound_holds_and_the_least_recently_used_go_first(cached: Server) -> None:
    tag = uuid.uuid4().hex
    queries = [f"distinct query number {i} {tag}" for i in range(3 * BOUND_ENTRIES)]
    for start in range(0, len(queries), MAX_CALL_TEXTS):
        cached.embed(queries[start : start + MAX_CALL_TEXTS])
        assert 0 < metrics(cached.running)[BYTES] - cached.others_bytes <= BOUND
    before = metrics(cached.running)
    cached.embed(queries[-1:])  # the most recent: kept
    cached.embed(queries[:1])  # the oldest: evicted long ago
    change = changes(before, metrics(cached.running))
    assert (change[HITS], change[MISSES]) == (1, 1)
    assert 0 < metrics(cached.running)[BYTES] - cached.others_bytes <= BOUND


# Texts asked of both servers: a few recur across examples (hits), most are new; some cannot be tokenized untruncated.
_RECURRING = [f"recurring query {i}" for i in range(5)] + [LONG]
_TEXT = st.one_of(
    st.sampled_from(_RECURRING),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=40).filter(str.strip),
)


@settings(max_examples=15)  # each example is four or five calls to real servers
@given(
    texts=st.lists(_TEXT, min_size=1, max_size=MAX_CALL_TEXTS),
    truncate=st.booleans(),
    dimensions=st.sampled_from([None, 128]),
)
def test_a_cached_embed_answers_as_an_uncached_one(
    cached: Server, uncached: Server, texts: list[str], truncate: bool, dimensions: int | None
) -> None:
    options = {"truncate": truncate, "dimensions": dimensions}
    try:
        expected = uncached.embed(texts, **options)
    except grpc.RpcError as refused:
        for _ in range(2):  # nothing was cached for the text refused
            with pytest.raises(grpc.RpcError) as again:
                cached.embed(texts, **options)
            assert (again.value.code(), again.value.details()) == (refused.code(), refused.details())
        return
    first, second = cached.embed(texts, **options), cached.embed(texts, **options)
    assert list(first.token_counts) == list(second.token_counts) == list(expected.token_counts)
    np.testing.assert_array_equal(vectors(second), vectors(first))  # the second is (mostly) hits
    cosines = (vectors(first) * vectors(expected)).sum(axis=1)  # batch mates may differ: the pool's own tolerance
    assert cosines.min() >= 0.99999


def test_the_benchmark_runs_quick_against_both_servers_and_writes_its_report(
    cached: Server, uncached: Server, tmp_path: Path
) -> None:
    """bench/query_cache.py, tiny, on these two servers (one database): the report's shape, and the answers agree.
    Loaded by path: bench/ is no package, and its tokenize.py would shadow the stdlib's."""
    spec = importlib.util.spec_from_file_location("bench_query_cache", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_query_cache"] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    on_metrics = f"http://127.0.0.1:{cached.running.metrics_port}/metrics"
    sizes = ["--docs", "40", "--queries", "6", "--searches", "24", "--rounds", "2", "--clients", "2"]
    targets = ["--on", f"127.0.0.1:{cached.running.port}", "--on-metrics", on_metrics]
    targets += ["--off", f"127.0.0.1:{uncached.running.port}", "--out", str(tmp_path)]
    report = bench.main([*sizes, *targets])
    assert json.loads((tmp_path / "query_cache.json").read_text()) == report
    assert set(report) == {"args", "machine", "workload", "arms", "rounds", "ratios", "cache", "correctness"}
    for arm in ("on", "off"):
        assert report["arms"][arm]["searches"] == 48 and len(report["rounds"][arm]) == 2
        assert set(report["arms"][arm]) >= {"p50_ms", "p99_ms", "searches_per_s_median", "first_asked", "repeated"}
    assert set(report["ratios"]) == {"p50_on_vs_off", "p99_on_vs_off", "throughput_on_vs_off"}
    assert report["rounds"]["off"][0]["hits"] == report["rounds"]["off"][0]["misses"] == 0
    cache = report["cache"]
    assert cache["hits"] + cache["misses"] == 48 and 0 < cache["hit_rate"] <= cache["hit_rate_possible"]
    correctness = report["correctness"]
    assert correctness["queries"] > 0 and set(correctness["ids_differ"]) == {"on_repeats", "off_repeats", "on_vs_off"}
    assert correctness["max_score_diff"]["on_repeats"] <= 1e-5 and correctness["max_score_diff"]["on_vs_off"] <= 1e-5
