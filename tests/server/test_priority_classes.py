"""Which priority class each operation's documents wait in (pool.priority), read from the pool's per-class queue
wait metric of the real server in this process: Search by text and small calls are interactive, Ingest and large
calls bulk."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY

from embedpool.service.limits import INTERACTIVE_DOCUMENTS
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import ingest_batches


def _jobs() -> dict[str, float]:
    """Calls a batch of which the engine has started so far, by class (every model's pool)."""
    jobs = {"interactive": 0.0, "bulk": 0.0}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == "embedpool_queue_wait_seconds_count":
                jobs[sample.labels["priority"]] += sample.value
    return jobs


def _documents(n: int) -> list[pb.Document]:
    return [pb.Document(id=f"p{i}", text=f"priority class document {i} {uuid.uuid4().hex}") for i in range(n)]


@pytest.fixture(scope="module")
def collection(stub: pb_grpc.EmbedderStub) -> str:
    name = f"prio_{uuid.uuid4().hex[:10]}"
    stub.CreateCollection(pb.CreateCollectionRequest(name=name))
    return name


CALLS: dict[str, tuple[str, Callable[[pb_grpc.EmbedderStub, str], object]]] = {
    "search by text": ("interactive", lambda s, c: s.Search(pb.SearchRequest(collection=c, text="a query", k=1))),
    "small embed": ("interactive", lambda s, c: s.Embed(pb.EmbedRequest(documents=_documents(INTERACTIVE_DOCUMENTS)))),
    "large embed": ("bulk", lambda s, c: s.Embed(pb.EmbedRequest(documents=_documents(INTERACTIVE_DOCUMENTS + 1)))),
    "small write": ("interactive", lambda s, c: s.Embed(pb.EmbedRequest(collection=c, documents=_documents(3)))),
    "ingest": ("bulk", lambda s, c: list(s.Ingest(ingest_batches(c, 2, 5, prefix=uuid.uuid4().hex), timeout=60))),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_each_operation_waits_in_its_class(stub: pb_grpc.EmbedderStub, collection: str, call: str) -> None:
    expected, run = CALLS[call]
    before = _jobs()
    run(stub, collection)
    after = _jobs()
    other = "bulk" if expected == "interactive" else "interactive"
    assert after[expected] > before[expected] and after[other] == before[other]
