"""A text's vector must not depend on what it is batched with: users compare vectors computed at different times."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedpool.model.convert import ALL_VARIANTS, Variant

from .conftest import Golden, Padded, Sessions, pad_batch, row_cosines

MIN_COSINE = 0.99999
MAX_TOKENS = 256
CLS, SEP, FIRST_WORD, VOCAB = 101, 102, 1996, 30522
# Right-padded to the batch's longest row (tests, benchmarks) and to a multiple of 16 (the pool's batcher).
PAD_MULTIPLES = (1, 16)

# Every variant runs on the CPU EP (fp16 is meant for CUDA, but this ORT build's CPU kernels cover it).
CPU_VARIANTS = list(ALL_VARIANTS)


def random_texts(lengths: list[int], seed: int) -> list[list[int]]:
    """Token rows of the given lengths ([CLS] words [SEP]); drawn from a seed so a failure's repr stays short."""
    rng = np.random.default_rng(seed)
    return [[CLS, *rng.integers(FIRST_WORD, VOCAB, size=n - 2).tolist(), SEP] for n in lengths]


def padded(rows: list[list[int]], multiple: int) -> Padded:
    longest = max(len(r) for r in rows)
    return pad_batch(rows, width=-(-longest // multiple) * multiple)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
@settings(max_examples=6)
@given(
    target=st.integers(0, 56),
    mate_lengths=st.lists(st.integers(2, MAX_TOKENS), min_size=1, max_size=39),
    seed=st.integers(0, 2**32 - 1),
    position=st.integers(0, 39),
    multiple=st.sampled_from(PAD_MULTIPLES),
)
def test_vector_does_not_depend_on_batch_mates(
    sessions: Sessions,
    golden: Golden,
    variant: Variant,
    target: int,
    mate_lengths: list[int],
    seed: int,
    position: int,
    multiple: int,
) -> None:
    session = sessions(variant)
    text = golden.input_ids[target]
    alone = session.embed(*padded([text], multiple))
    mates = random_texts(mate_lengths, seed)
    at = min(position, len(mates))
    rows = [*mates[:at], text, *mates[at:]]
    batched = session.embed(*padded(rows, multiple))[at]
    cos = float(row_cosines(alone, batched[None, :])[0])
    assert cos >= MIN_COSINE, (
        f"{variant}: {golden.texts[target][:40]!r} alone vs in {len(rows)} texts: cosine {cos:.6f}"
    )


def test_golden_texts_in_one_batch_match_each_alone(sessions: Sessions, golden: Golden) -> None:
    """Every golden text, each variant: alone vs all 57 together (right-padded to 256 tokens, the most padding)."""
    for variant in CPU_VARIANTS:
        session = sessions(variant)
        alone = np.concatenate([session.embed(*pad_batch([row])) for row in golden.input_ids])
        together = session.embed(*pad_batch(golden.input_ids, width=MAX_TOKENS))
        cos = row_cosines(alone, together)
        assert cos.min() >= MIN_COSINE, f"{variant}: worst {golden.texts[cos.argmin()][:40]!r} at {cos.min():.6f}"
