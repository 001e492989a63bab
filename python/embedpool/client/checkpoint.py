"""The checkpoint file of a resumable ingest: how far the server has acknowledged, and where to read on."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

__all__ = ["CHECKPOINT_SUFFIX", "Checkpoint", "CheckpointError", "checkpoint_path", "load", "save"]

CHECKPOINT_SUFFIX: Final = ".embedpool-ingest.json"
_VERSION: Final = 1


class CheckpointError(ValueError):
    """The checkpoint file exists but cannot be read."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    source: str
    """The source's key (a file's resolved path; empty for an iterable)."""
    target: str
    collection: str
    batch_id: int
    """The last acknowledged batch: every batch up to it is stored."""
    position: int
    """Where in the source the first unacknowledged document starts."""
    documents: int
    """Documents acknowledged so far, over all runs."""


def checkpoint_path(source: str | Path, state_dir: str | Path | None = None) -> Path:
    """`<source>.embedpool-ingest.json` next to the source, or in `state_dir`."""
    source = Path(source).resolve()
    if state_dir is None:
        return source.with_name(source.name + CHECKPOINT_SUFFIX)
    return Path(state_dir) / (source.name + CHECKPOINT_SUFFIX)


def load(path: Path, fresh: Checkpoint) -> Checkpoint | None:
    """The checkpoint in `path` if it is for `fresh`'s source, target and collection; None when there is none
    (or it is for another ingest, or of another version: starting over is safe, only slower)."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") != _VERSION:
            return None
        checkpoint = Checkpoint(**{k: v for k, v in data.items() if k != "version"})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e}); delete it to start over") from None
    if (checkpoint.source, checkpoint.target, checkpoint.collection) != (fresh.source, fresh.target, fresh.collection):
        return None
    return checkpoint


def save(path: Path, checkpoint: Checkpoint) -> None:
    """Atomically: a crash leaves the old checkpoint or the new one, never half of one. The folder is made if
    it does not exist (a --state-dir named for the first time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({"version": _VERSION, **asdict(checkpoint)}) + "\n")
    os.replace(temporary, path)
