"""`embedpool ingest` (embedpool.ingest.run_ingest) against a real server: counts, resume, exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from embedpool.ingest import SourceError, checkpoint_path, read_source, run_ingest
from embedpool.server.app import Running
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

DOCS = 300


@pytest.fixture
def target(server: Running) -> str:
    return f"127.0.0.1:{server.port}"


def _count(target: str, collection: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.EmbedderStub(channel).GetCollection(pb.GetCollectionRequest(name=collection)).count


def _jsonl(path: Path, n: int = DOCS) -> Path:
    with path.open("w") as f:
        for i in range(n):
            doc: dict[str, object] = {"text": f"passage number {i} about topic {i % 7}", "metadata": {"n": i}}
            if i % 3:  # the rest get ids derived from their text by the server
                doc["id"] = f"doc-{i}"
            f.write(json.dumps(doc) + "\n")
            if i == 10:
                f.write("\n")  # blank lines are skipped
    return path


class _Crash(Exception):
    pass


def test_jsonl_ingests_every_document(tmp_path: Path, target: str) -> None:
    source = _jsonl(tmp_path / "docs.jsonl")
    summary = run_ingest(target, "ingest-all", source, batch_size=32, progress=False)
    assert (summary.documents, summary.batches, summary.resumed_after) == (DOCS, 10, 0)
    assert (summary.inserted, summary.rejected) == (DOCS, [])
    assert _count(target, "ingest-all") == DOCS
    assert not checkpoint_path(source).exists()  # done: nothing to resume

    again = run_ingest(target, "ingest-all", source, batch_size=32, progress=False)
    assert (again.documents, again.inserted, again.updated) == (DOCS, 0, 0)
    assert _count(target, "ingest-all") == DOCS


def test_resume_after_a_crash_sends_only_what_was_not_acknowledged(tmp_path: Path, target: str) -> None:
    source = _jsonl(tmp_path / "docs.jsonl")
    acks: list[int] = []

    def crash_after_three(ack: pb.IngestAck) -> None:
        acks.append(ack.batch_id)
        if len(acks) == 3:
            raise _Crash

    with pytest.raises(_Crash):
        run_ingest(target, "ingest-resume", source, batch_size=25, progress=False, on_ack=crash_after_three)
    checkpoint = json.loads(checkpoint_path(source).read_text())
    assert (checkpoint["batch_id"], checkpoint["documents"]) == (3, 75)
    # Up to `window` batches beyond the acknowledged ones may have been stored before the stream died.
    assert 75 <= _count(target, "ingest-resume") <= 75 + 4 * 25

    resumed = run_ingest(target, "ingest-resume", source, batch_size=25, progress=False)
    assert (resumed.resumed_after, resumed.documents, resumed.batches) == (75, DOCS - 75, 9)
    assert resumed.inserted + resumed.unchanged + resumed.skipped_unchanged >= DOCS - 75
    assert resumed.updated == 0
    assert _count(target, "ingest-resume") == DOCS  # exactly one row per document
    assert not checkpoint_path(source).exists()


def test_directory_source_with_state_dir(tmp_path: Path, target: str) -> None:
    root = tmp_path / "notes"
    (root / "sub").mkdir(parents=True)
    (root / "a.md").write_text("# Alpha\n\nfirst note")
    (root / "sub" / "b.txt").write_text("second note")
    (root / "sub" / "skip.bin").write_bytes(b"\x00\x01")
    assert [d.id for d in read_source(root)] == ["a.md", "sub/b.txt"]
    state = tmp_path / "state"
    state.mkdir()
    summary = run_ingest(target, "ingest-dir", root, batch_size=1, progress=False, state_dir=state)
    assert (summary.documents, summary.inserted) == (2, 2)
    assert _count(target, "ingest-dir") == 2


def test_a_bad_line_names_its_place(tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(SourceError, match=r"bad.jsonl, byte 17: 'text' must be a non-empty string"):
        list(read_source(source))


def test_index_options_create_a_halfvec_collection_and_none_keep_an_existing_one(tmp_path: Path, target: str) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", n=40)
    half = pb.IndexOptions(halfvec=True)
    run_ingest(target, "ingest-half", source, batch_size=16, progress=False, index=half)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        got = stub.GetCollection(pb.GetCollectionRequest(name="ingest-half"))
        assert got.index.halfvec and got.count == 40
        hits = stub.Search(pb.SearchRequest(collection="ingest-half", text="passage number 5 about topic 5", k=1)).hits
        assert hits[0].text == "passage number 5 about topic 5"
    # No options: the existing halfvec collection is used as it is; options that differ are refused.
    again = run_ingest(target, "ingest-half", source, batch_size=16, progress=False)
    assert (again.inserted, again.updated) == (0, 0)
    with pytest.raises(grpc.RpcError) as err:
        run_ingest(target, "ingest-half", source, progress=False, index=pb.IndexOptions(m=8))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
