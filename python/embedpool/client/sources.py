"""Documents from files, readable again from a saved position: a JSONL file or a directory of text files.

A .jsonl file holds one object per line, `{"id"?: str, "text": str, "metadata"?: object}` (documents without an
id get one derived from their text by the server); its positions are byte offsets, so a resumed ingest seeks
instead of re-reading. A directory gives each *.txt and *.md file below it as a document, its id the path
relative to the directory; its positions count files in path order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from embedpool.client.ingest import Positioned
from embedpool.client.types import Document

__all__ = ["FileSource", "SourceError", "read_source"]

_TEXT_SUFFIXES: Final = frozenset({".txt", ".md"})


class SourceError(ValueError):
    """The source cannot be read as documents (bad JSON, missing text, ...); names the file and line."""


class FileSource:
    """A JSONL file or a directory, as an ingest source (embedpool.client.ingest.Source)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"{self.path}: no such file or directory")

    @property
    def key(self) -> str:
        return str(self.path.resolve())

    def read(self, start: int) -> Iterator[Positioned]:
        return read_source(self.path, start)

    def remaining(self, start: int) -> int | None:
        """An upper bound, for a progress bar's ETA (one quick pass: blank lines count)."""
        if self.path.is_dir():
            return len(_directory_files(self.path)) - start
        with self.path.open("rb") as f:
            f.seek(start)
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def read_source(source: Path, start: int = 0) -> Iterator[Positioned]:
    """The documents of `source` from position `start` (0: the beginning), each with the position after it."""
    if source.is_dir():
        yield from _read_directory(source, start)
    else:
        yield from _read_jsonl(source, start)


def _read_jsonl(path: Path, start: int) -> Iterator[Positioned]:
    with path.open("rb") as f:
        if start:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                raise SourceError(f"{path}: the checkpoint's position {start} is not a line start (file changed?)")
        offset = start
        while line := f.readline():
            offset += len(line)
            if not line.strip():
                continue
            where = f"{path}, byte {offset - len(line)}"
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SourceError(f"{where}: not JSON ({e})") from None
            yield Positioned(_from_object(obj, where), offset)


def _from_object(obj: object, where: str) -> Document:
    if not isinstance(obj, dict):
        raise SourceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text, doc_id, metadata = obj.get("text"), obj.get("id", ""), obj.get("metadata")
    if not isinstance(text, str) or not text:
        raise SourceError(f"{where}: 'text' must be a non-empty string")
    if not isinstance(doc_id, str):
        raise SourceError(f"{where}: 'id' must be a string")
    if metadata is not None and not isinstance(metadata, dict):
        raise SourceError(f"{where}: 'metadata' must be a JSON object")
    return Document(text, doc_id, metadata)


def _directory_files(root: Path) -> list[Path]:
    files = (p for p in root.rglob("*") if p.suffix in _TEXT_SUFFIXES and p.is_file())
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_directory(root: Path, start: int) -> Iterator[Positioned]:
    for n, path in enumerate(_directory_files(root)[start:], start=start + 1):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SourceError(f"{path}: not UTF-8 ({e})") from None
        if text.strip():
            yield Positioned(Document(text, path.relative_to(root).as_posix()), n)
