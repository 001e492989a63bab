"""`embedpool ingest` and the client's file ingest under it (embedpool.client: Client.ingest of a FileSource with
a checkpoint file) against a real server: counts, resume, exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from embedpool import cli
from embedpool.client import (
    Client,
    FileSource,
    IndexOptions,
    IngestProgress,
    IngestSummary,
    SourceError,
    checkpoint_path,
)
from embedpool.client.sources import read_source
from embedpool.errors import AlreadyExists
from embedpool.server.app import Running

DOCS = 300


@pytest.fixture
def target(server: Running) -> str:
    return f"127.0.0.1:{server.port}"


def run_ingest(
    target: str,
    collection: str,
    source: Path,
    *,
    index: IndexOptions | None = None,
    state_dir: Path | None = None,
    **options: Any,
) -> IngestSummary:
    """What `embedpool ingest` does: create the collection (as it is, unless index options are given), then
    ingest the file resumably."""
    with Client(target) as client:
        client.create_collection(collection, index=index, exist_ok=index is None)
        return client.ingest(collection, FileSource(source), checkpoint=checkpoint_path(source, state_dir), **options)


def _count(target: str, collection: str) -> int:
    with Client(target) as client:
        return client.get_collection(collection).count


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
    summary = run_ingest(target, "ingest-all", source, batch_size=32)
    assert (summary.documents, summary.batches, summary.resumed_after) == (DOCS, 10, 0)
    assert (summary.inserted, summary.rejected) == (DOCS, [])
    assert _count(target, "ingest-all") == DOCS
    assert not checkpoint_path(source).exists()  # done: nothing to resume

    again = run_ingest(target, "ingest-all", source, batch_size=32)
    assert (again.documents, again.inserted, again.updated) == (DOCS, 0, 0)
    assert _count(target, "ingest-all") == DOCS


def test_resume_after_a_crash_sends_only_what_was_not_acknowledged(tmp_path: Path, target: str) -> None:
    source = _jsonl(tmp_path / "docs.jsonl")
    reports: list[IngestProgress] = []

    def crash_after_three(progress: IngestProgress) -> None:
        reports.append(progress)
        if len(reports) == 4:  # the first report comes before anything is sent
            raise _Crash

    with pytest.raises(_Crash):
        run_ingest(target, "ingest-resume", source, batch_size=25, progress=crash_after_three)
    assert reports[0].batch is None and reports[0].total == DOCS + 1  # a line count: the blank line is in
    assert [r.batch.batch_id for r in reports[1:] if r.batch] == [1, 2, 3]
    checkpoint = json.loads(checkpoint_path(source).read_text())
    assert (checkpoint["batch_id"], checkpoint["documents"]) == (3, 75)
    # Up to `window` batches beyond the acknowledged ones may have been stored before the stream died.
    assert 75 <= _count(target, "ingest-resume") <= 75 + 4 * 25

    resumed = run_ingest(target, "ingest-resume", source, batch_size=25)
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
    assert [d.document.id for d in read_source(root) if not isinstance(d.document, str)] == ["a.md", "sub/b.txt"]
    state = tmp_path / "state" / "made-on-first-save"  # not there yet: the first checkpoint makes it
    summary = run_ingest(target, "ingest-dir", root, batch_size=1, state_dir=state)
    assert (summary.documents, summary.inserted) == (2, 2)
    assert _count(target, "ingest-dir") == 2
    assert state.is_dir() and not checkpoint_path(root, state).exists()  # done: nothing left to resume


def test_a_bad_line_names_its_place(tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(SourceError, match=r"bad.jsonl, byte 17: 'text' must be a non-empty string"):
        list(read_source(source))


def test_a_bad_line_ends_the_ingest_after_what_came_before(tmp_path: Path, target: str) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text("".join(json.dumps({"id": f"g{i}", "text": f"good {i}"}) + "\n" for i in range(4)) + "[1]\n")
    with pytest.raises(SourceError, match="expected a JSON object"):
        run_ingest(target, "ingest-bad", source, batch_size=2)
    assert _count(target, "ingest-bad") == 4
    assert json.loads(checkpoint_path(source).read_text())["documents"] == 4


def test_index_options_create_a_halfvec_collection_and_none_keep_an_existing_one(tmp_path: Path, target: str) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", n=40)
    run_ingest(target, "ingest-half", source, batch_size=16, index=IndexOptions(halfvec=True))
    with Client(target) as client:
        got = client.get_collection("ingest-half")
        assert got.index.halfvec and got.count == 40
        hits = client.search("ingest-half", "passage number 5 about topic 5", k=1)
        assert hits[0].text == "passage number 5 about topic 5"
    # No options: the existing halfvec collection is used as it is; options that differ are refused.
    again = run_ingest(target, "ingest-half", source, batch_size=16)
    assert (again.inserted, again.updated) == (0, 0)
    with pytest.raises(AlreadyExists):
        run_ingest(target, "ingest-half", source, index=IndexOptions(m=8))


def test_the_command_prints_a_summary_and_resumes(
    tmp_path: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", n=30)
    command = ["ingest", "ingest-cmd", str(source), "--target", target, "--batch-size", "8", "--quiet"]
    assert cli.main(command) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["documents"], summary["inserted"], summary["rejected"]) == (30, 30, 0)
    assert cli.main([*command, "--hnsw-m", "8"]) == 1  # the collection exists with other options
    assert "AlreadyExists" in capsys.readouterr().err
    stored = ["ingest", "ingest-f16", str(source), "--target", target, "--storage", "float16", "--quiet"]
    assert cli.main(stored) == 0
    capsys.readouterr()
    with Client(target) as client:
        assert client.get_collection("ingest-f16").storage == "float16"
    missing = ["ingest", "ingest-cmd", str(tmp_path / "none.jsonl"), "--target", target]
    assert cli.main(missing) == 2
    assert "no such file or directory" in capsys.readouterr().err
