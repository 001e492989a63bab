"""A server under overload and with a failing engine: precise statuses, nothing hangs, and it keeps serving."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from embedpool.engine import Engine, load_engine
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

from ..conftest import SettingsFactory, ingest_batches, serving


@pytest.fixture(scope="module")
def faulty(
    tmp_path_factory: pytest.TempPathFactory, make_settings: SettingsFactory, poisoned_session: Callable[..., Any]
) -> Iterator[pb_grpc.EmbedderStub]:
    settings = make_settings(
        tmp_path_factory.mktemp("faulty"),
        max_concurrent_inputs=32,
        max_request_documents=32,
        max_ingest_streams=2,
        max_batch_size=8,
        variant="fp32_opt",
        query_cache_bytes=0,  # these calls resend their texts: every one must reach the pool and the engine
    )
    engine: Engine = load_engine(settings)
    poison = int(engine.tokenizer.encode_ragged(["zeppelin"])[0][1])
    engine = dataclasses.replace(engine, sessions=[poisoned_session(engine.sessions[0], poison)])
    with serving(settings, engine) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield pb_grpc.EmbedderStub(channel)


def _request(n: int, text: str = "an ordinary sentence about databases") -> pb.EmbedRequest:
    return pb.EmbedRequest(documents=[pb.Document(text=f"{text} {i}") for i in range(n)])


def test_overload_gets_resource_exhausted_and_admitted_requests_are_right(faulty: pb_grpc.EmbedderStub) -> None:
    codes: list[grpc.StatusCode] = []
    replies: list[pb.EmbedResponse] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            reply = faulty.Embed(_request(8), timeout=120)
        except grpc.RpcError as err:
            with lock:
                codes.append(err.code())
            assert "capacity" in (err.details() or "")
        else:
            with lock:
                replies.append(reply)

    threads = [threading.Thread(target=call) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert codes and set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert replies, "nothing was admitted"
    reference = np.frombuffer(faulty.Embed(_request(8)).vectors[3], dtype="<f4")
    for reply in replies:
        got = np.frombuffer(reply.vectors[3], dtype="<f4")
        assert float(got @ reference) > 0.9999


def test_engine_fault_fails_only_its_request_with_internal_and_request_id(faulty: pb_grpc.EmbedderStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        faulty.Embed(_request(1, "a zeppelin"), metadata=(("x-request-id", "fault-42"),), timeout=60)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    details = err.value.details() or ""
    assert "fault-42" in details and "document 0" in details
    assert "injected" not in details  # the engine's message is logged, not sent
    assert len(faulty.Embed(_request(4), timeout=60).vectors) == 4


def test_expired_deadline_is_deadline_exceeded(faulty: pb_grpc.EmbedderStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        faulty.Embed(_request(32, "a long text " * 40), timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(faulty.Embed(_request(2), timeout=60).vectors) == 2


def test_an_ingest_stream_waits_for_room_while_unary_calls_are_refused(faulty: pb_grpc.EmbedderStub) -> None:
    name = f"overloaded_{uuid.uuid4().hex[:8]}"
    faulty.CreateCollection(pb.CreateCollectionRequest(name=name))
    stop = threading.Event()
    refused = 0

    def flood() -> None:
        nonlocal refused
        while not stop.is_set():
            try:
                faulty.Embed(_request(24), timeout=60)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                refused += 1

    flooders = [threading.Thread(target=flood) for _ in range(4)]
    for t in flooders:
        t.start()
    try:
        acks = list(faulty.Ingest(ingest_batches(name, 6, 32), timeout=120))
    finally:
        stop.set()
        for t in flooders:
            t.join(60)
    assert [a.batch_id for a in acks] == list(range(6))
    assert faulty.GetCollection(pb.GetCollectionRequest(name=name)).count == 6 * 32
    assert refused > 0, "the flood never filled the budget: the test proved nothing"


def test_ingest_streams_beyond_the_limit_are_refused(faulty: pb_grpc.EmbedderStub) -> None:
    name = f"streams_{uuid.uuid4().hex[:8]}"
    faulty.CreateCollection(pb.CreateCollectionRequest(name=name))
    release = threading.Event()

    def held_open() -> Iterator[pb.IngestRequest]:
        yield pb.IngestRequest(collection=name, batch_id=0, documents=[pb.Document(id="x", text="held")])
        release.wait(60)

    open_streams = [faulty.Ingest(held_open(), timeout=60) for _ in range(2)]
    try:
        for call in open_streams:
            next(iter(call))  # each stream is being served (its first ack came back)
        with pytest.raises(grpc.RpcError) as err:
            list(faulty.Ingest(iter([pb.IngestRequest(collection=name, documents=[_doc_text()])]), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Ingest streams" in (err.value.details() or "")
    finally:
        release.set()
        for call in open_streams:
            list(call)


def _doc_text() -> pb.Document:
    return pb.Document(text="one too many")


class _Breakable:
    """A real session that fails every call while `broken`: an engine that stopped working (a lost GPU)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.broken = False

    def embed(self, input_ids: Any, attention_mask: Any) -> Any:
        if self.broken:
            raise RuntimeError("device lost")
        return self.inner.embed(input_ids, attention_mask)


def test_health_is_not_serving_while_no_session_works(
    tmp_path: Path, make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from embedpool.pool import feeder

    monkeypatch.setattr(feeder, "PROBE_INTERVAL_S", 0.2)
    settings = make_settings(tmp_path, variant="fp32_opt", query_cache_bytes=0)  # every call reaches the engine
    engine: Engine = load_engine(settings)
    session = _Breakable(engine.sessions[0])
    engine = dataclasses.replace(engine, sessions=[session])
    ok = health_pb2.HealthCheckResponse.SERVING
    with serving(settings, engine) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub, health = pb_grpc.EmbedderStub(channel), health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            return int(health.Check(health_pb2.HealthCheckRequest(service="")).status)

        session.broken = True
        codes = []
        for _ in range(feeder.FAILED_BATCHES_TO_REMOVE + 1):
            with pytest.raises(grpc.RpcError) as err:
                stub.Embed(_request(1), timeout=30)
            codes.append(err.value.code())
        assert codes[-1] == grpc.StatusCode.UNAVAILABLE  # out of rotation: refused at once, retryable
        _wait_for(lambda: status() != ok)
        session.broken = False
        _wait_for(lambda: status() == ok)
        assert len(stub.Embed(_request(2), timeout=30).vectors) == 2


def _wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
