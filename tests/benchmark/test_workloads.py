"""What a run sends: synthetic texts of exact token lengths (checked with the Hugging Face tokenizer itself), and
the built-in corpus, which must stay the passages of the project's shared corpus script."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from embedpool.benchmark import corpus
from embedpool.benchmark.local_model import TokenCounter
from embedpool.benchmark.synthetic import exact_length_texts
from embedpool.errors import InvalidArgument
from embedpool.model import load_model_dir

BENCH_CORPUS = Path(__file__).resolve().parents[2] / "bench" / "corpus.py"


@pytest.fixture(scope="module")
def counter(model_dir: Path) -> TokenCounter:
    return TokenCounter(load_model_dir(model_dir))


@pytest.mark.parametrize("tokens", [3, 16, 128, 256])
def test_synthetic_texts_have_exactly_the_tokens_asked_for(counter: TokenCounter, tokens: int) -> None:
    texts = exact_length_texts(counter, tokens, 12)
    assert len(set(texts)) == 12  # different texts, not one repeated
    reference = Tokenizer.from_file(str(counter.bundle.tokenizer_path))
    reference.no_truncation()
    reference.no_padding()
    assert [len(e.ids) for e in reference.encode_batch(texts)] == [tokens] * 12
    assert counter.count(texts).tolist() == [tokens] * 12


@pytest.mark.parametrize(("tokens", "why"), [(257, "above the model's limit of 256"), (2, "special tokens alone")])
def test_impossible_lengths_are_refused(counter: TokenCounter, tokens: int, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        exact_length_texts(counter, tokens, 1)


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # the shared script leaves the files it reads to the GC
def test_the_package_corpus_is_the_shared_scripts() -> None:
    spec = importlib.util.spec_from_file_location("shared_corpus", BENCH_CORPUS)
    assert spec is not None and spec.loader is not None
    shared = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shared)
    assert corpus.passages(n=300) == shared.passages(n=300)
