"""A server with `--device null` (no inference) runs the whole real serving path: it answers Embed with unit vectors
of the model's dimension and the tokenizer's real counts, reports ready, and counts its work in /metrics; and
`embedpool bench --front-end` runs its ceiling table against it. Timings are recorded, never judged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from embedpool import _native
from embedpool.model import load_model_dir
from embedpool.server.app import Running
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import SettingsFactory, serving
from .conftest import Bench, grpc_target

TEXTS = ["a short query", "Return the number of items in a container. " * 40, "x"]


@pytest.fixture(scope="module")
def null_server(tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory) -> Iterator[Running]:
    # Without the query cache: the front end's own work is measured, every text embedded (by the null device).
    settings = make_settings(tmp_path_factory.mktemp("null-server"), device="null", query_cache_bytes=0)
    with serving(settings) as running:
        yield running


def test_null_device_answers_with_unit_vectors_and_real_token_counts(null_server: Running, model_dir: Path) -> None:
    bundle = load_model_dir(model_dir)
    tokenizer = _native.Tokenizer(str(bundle.tokenizer_path), max_length=bundle.config.max_tokens)
    _, offsets = tokenizer.encode_ragged(TEXTS)
    with grpc.insecure_channel(f"127.0.0.1:{null_server.port}") as channel:
        stub = pb_grpc.EmbedderStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        reply = stub.Embed(pb.EmbedRequest(documents=[pb.Document(text=t) for t in TEXTS]))
    assert (info.device, info.variant, info.dim) == ("null", "null", bundle.config.dim)
    vectors = np.stack([np.frombuffer(v, dtype="<f4") for v in reply.vectors])
    assert vectors.shape == (len(TEXTS), bundle.config.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert list(reply.token_counts) == np.diff(offsets).tolist()
    assert reply.token_counts[1] == bundle.config.max_tokens  # truncated, as on a real device


def documents_embedded(running: Running) -> float:
    metrics = httpx.get(f"http://127.0.0.1:{running.metrics_port}/metrics").text
    return next(float(line.split()[1]) for line in metrics.splitlines() if line.startswith("embedpool_documents_total"))


def test_null_device_reports_ready_and_counts_its_work(null_server: Running) -> None:
    assert httpx.get(f"http://127.0.0.1:{null_server.http_port}/ready").status_code == 200
    before = documents_embedded(null_server)
    with grpc.insecure_channel(f"127.0.0.1:{null_server.port}") as channel:
        pb_grpc.EmbedderStub(channel).Embed(pb.EmbedRequest(documents=[pb.Document(text=t) for t in TEXTS]))
    assert documents_embedded(null_server) - before == len(TEXTS)


def test_front_end_preset_runs_the_ceiling_table(null_server: Running, bench: Bench) -> None:
    data = bench(*grpc_target(null_server), "--front-end", "--docs", "64", "--duration", "0.3", "--warmup", "0")
    per_request = [step["docs_per_request"] for step in data["steps"]]
    assert per_request == [1, 8, 32, 128]
    for step in data["steps"]:
        assert step["errors"] == {} and step["docs"] == step["ok_requests"] * step["docs_per_request"]
        assert step["server"]["tokens"] == step["tokens"]
