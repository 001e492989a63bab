"""Texts of an exact token length, built with the model's own tokenizer: how TEI and Snowflake's Arctic Inference
report throughput (per sequence length), so that figures compare across servers.

A length counts every token the model sees, [CLS] and [SEP] included (the server's token count). The words are
real text (the built-in corpus, each text starting at a different word), not one token repeated: a repeated token
would make an unrealistically easy input for some kernels.
"""

from __future__ import annotations

from embedpool.benchmark.corpus import passages
from embedpool.benchmark.local_model import TokenCounter
from embedpool.errors import InvalidArgument

__all__ = ["exact_length_texts"]

# Fillers tried, in turn, to add the last few tokens when the next word would overshoot: each is one token in
# common vocabularies (WordPiece and byte-level BPE alike).
_FILLERS = (" a", " the", " and", " of")
_DISTINCT = 1024


def exact_length_texts(counter: TokenCounter, tokens: int, n: int) -> list[str]:
    """`n` texts of exactly `tokens` tokens each: up to `_DISTINCT` different ones (fewer for very short lengths),
    repeated beyond that (a server embeds a repeated text again, so repeats cost what new texts do)."""
    if tokens > counter.max_tokens:
        raise InvalidArgument(f"--tokens {tokens}: above the model's limit of {counter.max_tokens} tokens")
    floor = int(counter.uncapped([""])[0])  # the special tokens alone
    if tokens <= floor:
        raise InvalidArgument(f"--tokens {tokens}: the model's special tokens alone take {floor}")
    words = " ".join(passages(n=1000)).split()
    distinct: list[str] = []
    seen: set[str] = set()
    for attempt in range(3 * min(n, _DISTINCT) + 100):  # very short lengths have fewer different texts
        if len(distinct) == min(n, _DISTINCT):
            break
        # A prime stride: each text starts somewhere else in the corpus.
        text = _fit(counter, words, attempt * 7919 % len(words), tokens)
        if text is not None and text not in seen:
            seen.add(text)
            distinct.append(text)
    if not distinct:
        raise InvalidArgument(f"--tokens {tokens}: could not build texts of exactly that many tokens")
    return [distinct[i % len(distinct)] for i in range(n)]


def _fit(counter: TokenCounter, words: list[str], start: int, tokens: int) -> str | None:
    """The longest run of words from `start` within `tokens` tokens, topped up with one-token fillers; None when
    no filler lands exactly on `tokens`."""
    lo, hi = 0, min(tokens, len(words) - start)  # every word is at least one token
    while lo < hi:  # the longest prefix of words that fits (counts grow with the prefix)
        mid = (lo + hi + 1) // 2
        if counter.uncapped([" ".join(words[start : start + mid])])[0] <= tokens:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join(words[start : start + lo])
    short = tokens - int(counter.uncapped([text])[0])
    for filler in _FILLERS:
        candidate = (text + filler * short).strip()
        if int(counter.uncapped([candidate])[0]) == tokens:
            return candidate
    return None
