"""What a run sends: a named list of texts with their token counts, cut into requests of a fixed size."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedpool.benchmark.corpus import passages
from embedpool.benchmark.local_model import TokenCounter
from embedpool.benchmark.synthetic import exact_length_texts
from embedpool.errors import InvalidArgument

__all__ = ["Request", "Workload", "corpus_workload", "jsonl_workload", "token_workloads"]


@dataclass(frozen=True, slots=True)
class Request:
    texts: list[str]
    tokens: int | None
    """Tokens of its texts as the server counts them; None without a local tokenizer."""


@dataclass(frozen=True)
class Workload:
    name: str
    """"corpus", "jsonl:<file name>" or "tokens=<n>"."""
    texts: list[str]
    tokens: list[int] | None
    """Per text; None without a local tokenizer."""

    def requests(self, per_request: int) -> list[Request]:
        """The texts in order, `per_request` at a time; every request is full (the texts wrap around), so a
        step's documents are always requests x per_request."""
        n = len(self.texts)
        count = -(-n // per_request)
        out = []
        for r in range(count):
            positions = [(r * per_request + i) % n for i in range(per_request)]
            tokens = None if self.tokens is None else sum(self.tokens[p] for p in positions)
            out.append(Request([self.texts[p] for p in positions], tokens))
        return out

    def describe(self) -> dict[str, object]:
        lengths = np.asarray(self.tokens if self.tokens is not None else [], dtype=np.int64)
        return {
            "name": self.name,
            "docs": len(self.texts),
            "mean_chars": float(np.mean([len(t) for t in self.texts])) if self.texts else 0.0,
            "tokens_mean": float(lengths.mean()) if lengths.size else None,
            "tokens_p50": int(np.median(lengths)) if lengths.size else None,
            "tokens_max": int(lengths.max()) if lengths.size else None,
        }


def _counted(name: str, texts: list[str], counter: TokenCounter | None) -> Workload:
    return Workload(name, texts, None if counter is None else [int(c) for c in counter.count(texts)])


def _cycled(texts: list[str], n: int) -> list[str]:
    return [texts[i % len(texts)] for i in range(n)]


def corpus_workload(n: int, counter: TokenCounter | None) -> Workload:
    """`n` passages of the built-in corpus (repeated when it has fewer)."""
    return _counted("corpus", _cycled(passages(n=n), n), counter)


def jsonl_workload(path: Path, n: int, counter: TokenCounter | None) -> Workload:
    """The "text" of each line of a JSONL file, the first `n` (repeated when it has fewer)."""
    texts: list[str] = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidArgument(f"{path}:{number}: not JSON ({exc.msg})") from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise InvalidArgument(f'{path}:{number}: expected {{"text": "..."}}')
                texts.append(text)
                if len(texts) >= n:
                    break
    except OSError as exc:
        raise InvalidArgument(f"{path}: {exc.strerror}") from None
    if not texts:
        raise InvalidArgument(f"{path}: no texts")
    return _counted(f"jsonl:{path.name}", _cycled(texts, n), counter)


def token_workloads(lengths: list[int], n: int, counter: TokenCounter | None) -> list[Workload]:
    """One workload of `n` texts per exact token length."""
    if counter is None:
        raise InvalidArgument("--tokens: needs the model's tokenizer (pass --model DIR)")
    return [Workload(f"tokens={t}", exact_length_texts(counter, t, n), [t] * n) for t in lengths]
