"""AsyncClient does what Client does, on asyncio: the same results, splitting, fail-over, errors and ingest."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedpool.client import (
    AsyncClient,
    Client,
    Document,
    FileSource,
    IndexOptions,
    IngestProgress,
    Limits,
    checkpoint_path,
)
from embedpool.errors import InvalidArgument, NotFound
from embedpool.server.app import Running

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
async def one_event_loop() -> AsyncIterator[None]:
    """Holds anyio's test runner, and so one event loop, for the whole module: grpc.aio's poller thread may still
    post a finished test's late channel events to that test's loop, which fails the next test if each test had
    its own, closed, loop."""
    yield


@pytest.fixture
def target(server: Running) -> str:
    return f"127.0.0.1:{server.port}"


def _nothing_listens() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_the_calls_match_the_sync_client(target: str) -> None:
    texts = [f"async parity text {i} on theme {i % 4}" for i in range(11)]
    with Client(target) as sync:
        expected = sync.embed(texts)
    # A dead first target and small limits: fail-over and splitting on the async path too.
    async with AsyncClient([_nothing_listens(), target], limits=Limits(max_request_documents=4)) as client:
        assert (await client.model_info()).dim == 384
        vectors = await client.embed(texts)
        assert vectors.dtype == np.float32
        np.testing.assert_allclose(vectors, expected, atol=1e-5)

        created = await client.create_collection("aio-docs", index=IndexOptions(halfvec=True))
        assert created.index.halfvec
        docs = [Document(t, id=f"a{i}", metadata={"i": i, "even": i % 2 == 0}) for i, t in enumerate(texts)]
        stored = await client.upsert("aio-docs", docs, return_vectors=True)
        assert (stored.ids, stored.inserted) == ([f"a{i}" for i in range(11)], 11)
        assert stored.vectors is not None
        np.testing.assert_allclose(stored.vectors, expected, atol=1e-5)

        hits = await client.search("aio-docs", texts[3], k=3, include_vectors=True)
        assert hits[0].id == "a3" and hits[0].metadata == {"i": 3.0, "even": False}
        assert hits[0].vector is not None
        np.testing.assert_allclose(hits[0].vector, expected[3], atol=1e-5)
        by_vector = await client.search("aio-docs", expected[5], k=1, filter={"even": False})
        assert [h.id for h in by_vector] == ["a5"]
        assert [h.id for h in await client.search("aio-docs", texts[5], filter={"even": True}, min_score=0.99)] == []

        assert await client.delete("aio-docs", filter={"even": True}) == 6
        assert await client.delete("aio-docs", ["a1", "a3", "missing"]) == 2
        assert (await client.get_collection("aio-docs")).count == 3
        assert "aio-docs" in {c.name for c in await client.list_collections()}
        await client.drop_collection("aio-docs")
        with pytest.raises(NotFound):
            await client.get_collection("aio-docs")
        with pytest.raises(InvalidArgument, match=r"documents\[9\]"):
            await client.embed([*texts[:9], ""])


class _Crash(Exception):
    pass


async def test_ingest_resumes_after_a_crash(tmp_path: Path, target: str) -> None:
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": f"r{i}", "text": f"resumable {i}"}) + "\n" for i in range(100)))
    checkpoint = checkpoint_path(source)
    acknowledged: list[int] = []

    def crash_after_two(progress: IngestProgress) -> None:
        if progress.batch is not None:
            acknowledged.append(progress.batch.batch_id)
            if len(acknowledged) == 2:
                raise _Crash

    async with AsyncClient(target) as client:
        await client.create_collection("aio-ingest", exist_ok=True)
        with pytest.raises(_Crash):
            await client.ingest(
                "aio-ingest", FileSource(source), batch_size=10, checkpoint=checkpoint, progress=crash_after_two
            )
        assert json.loads(checkpoint.read_text())["documents"] == 20
        summary = await client.ingest("aio-ingest", FileSource(source), batch_size=10, checkpoint=checkpoint)
        assert (summary.resumed_after, summary.documents, summary.batches) == (20, 80, 8)
        assert (await client.get_collection("aio-ingest")).count == 100
        assert not checkpoint.exists()
        again = await client.ingest("aio-ingest", [f"resumable {i}" for i in range(5)], bulk=False)
        assert again.documents == 5


async def test_a_failing_source_ends_the_ingest_after_what_it_gave(target: str) -> None:
    def documents() -> Iterator[str]:
        yield from (f"before the failure {i}" for i in range(6))
        raise _Crash

    async with AsyncClient(target) as client:
        await client.create_collection("aio-failing", exist_ok=True)
        with pytest.raises(_Crash):
            await client.ingest("aio-failing", documents(), batch_size=3)
        assert (await client.get_collection("aio-failing")).count == 6


async def test_callers_sharing_a_client_are_not_queued_behind_its_split_slots(target: str) -> None:
    """`concurrency` bounds the split calls of one method call; unsplit calls of many callers go out at once."""
    async with AsyncClient(target, concurrency=1) as client:
        await client.model_info()
        in_flight = peak = 0
        call = client._call

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await call(*args, **kwargs)
            finally:
                in_flight -= 1

        client._call = counted  # type: ignore[method-assign]  # counts the RPCs in flight, then makes them
        await asyncio.gather(*(client.embed([f"caller {i} asks for one vector"]) for i in range(6)))
        assert peak > 1
