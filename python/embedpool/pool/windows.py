"""Long inputs embedded whole: each document's tokens split into windows of the model's length, every window a
row of its own for the scheduler (so windows of many documents batch together with other work), and the window
vectors pooled back into one vector per document.

Pooling is the mean of the window vectors weighted by each window's content tokens, then L2-normalised. A token in
the overlap of two windows counts in both: each window's vector summarises all of its tokens, so de-duplicating
would under-weight exactly the windows that overlap. A document that fits one window gets the vector truncation
would give it, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from embedpool.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class Chunking:
    """A request's long-input options."""

    overlap: int = 0
    """Content tokens each window shares with the one before (the caller checks it is below half a window)."""
    max_windows: int = 256
    """Windows of the whole request, at most."""
    prompt: str = ""
    """The model's prompt for these texts (not in them): put at the start of every window, not the first only."""


@dataclass(frozen=True, slots=True)
class Specials:
    """The tokens the tokenizer puts around every text ([CLS] ... [SEP] for BERT)."""

    prefix: NDArray[np.int64]
    suffix: NDArray[np.int64]

    @classmethod
    def of(cls, empty: NDArray[np.int64], one_word: NDArray[np.int64]) -> Specials:
        """From the ids of an empty text and of a one-token text: the prefix is what they start with alike."""
        p = 0
        while p < len(empty) and p < len(one_word) and empty[p] == one_word[p]:
            p += 1
        return cls(empty[:p].copy(), empty[p:].copy())

    def __len__(self) -> int:
        return len(self.prefix) + len(self.suffix)


@dataclass(frozen=True, slots=True)
class Windows:
    """The windows of a request's documents as ragged rows, like a tokenizer's output."""

    ids: NDArray[np.int64]
    offsets: NDArray[np.int64]
    """Window w is ids[offsets[w]:offsets[w + 1]], special tokens included."""
    weights: NDArray[np.float32]
    """Each window's content tokens."""
    counts: NDArray[np.int64]
    """Windows of each document; document d's are the counts[:d].sum()-th onwards."""
    token_counts: NDArray[np.int64]
    """Each whole document's tokens, special tokens included once."""

    def __len__(self) -> int:
        return len(self.weights)


Encode = Callable[[Sequence[str]], tuple[NDArray[np.int64], NDArray[np.int64]]]
"""Texts to ragged (ids, offsets), untruncated: a tokenizer's encode_ragged without a length limit."""


CharOffsets = Callable[[str], NDArray[np.int64]]
"""A text's content tokens (no special tokens), untruncated, as [n, 2] character (start, end) spans."""


@dataclass(frozen=True, slots=True)
class Passage:
    """A window as a stretch of its text: content tokens [token_start, token_end), characters [char_start,
    char_end)."""

    token_start: int
    token_end: int
    char_start: int
    char_end: int


@dataclass(frozen=True, slots=True)
class Splitter:
    """What the pool needs to split a model's long inputs: an untruncated tokenizer and the model's length."""

    encode: Encode
    max_length: int
    specials: Specials
    char_offsets: CharOffsets | None = None
    """For `passages` (windows stored as rows of their own); None: not offered."""

    @classmethod
    def of(cls, encode: Encode, max_length: int, char_offsets: CharOffsets | None = None) -> Splitter:
        specials = Specials.of(encode([""])[0], encode(["a"])[0])
        if max_length - len(specials) < 2:
            raise ValueError(f"max_length {max_length} leaves no room for windows")
        return cls(encode, max_length, specials, char_offsets)

    def windows(self, texts: Sequence[str], chunking: Chunking) -> Windows:
        ids, offsets = self.encode(texts)
        return split(ids, offsets, self.specials, self.max_length, chunking, self.content(chunking.prompt))

    def content(self, text: str) -> NDArray[np.int64]:
        """`text`'s tokens without the special ones around them."""
        if not text:
            return np.empty(0, np.int64)
        ids, _ = self.encode([text])
        return ids[len(self.specials.prefix) : len(ids) - len(self.specials.suffix)]

    def passages(self, text: str, overlap: int) -> list[Passage]:
        """The windows of `text` as stretches of it, from the first character of a window's first token to the last
        of its last (each is then embedded as a text of its own: it may tokenize a little differently at its
        edges, where a word was cut, but its vector is that of the text stored with it)."""
        if self.char_offsets is None:
            raise ValueError("this model's tokenizer gives no character offsets")
        chars = self.char_offsets(text)
        if len(chars) == 0:
            return [Passage(0, 0, 0, len(text))]
        return [
            Passage(start, end, int(chars[start, 0]), int(chars[end - 1, 1]))
            for start, end in spans(len(chars), self.max_length - len(self.specials), overlap)
        ]


def spans(content: int, width: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of each window over `content` tokens: `width` wide, each starting `width - overlap` after the
    one before, the last ending at the end (an empty document is one empty window)."""
    if not 0 <= overlap < width:
        raise ValueError(f"overlap {overlap} must be in [0, {width})")
    out = [(0, min(width, content))]
    while out[-1][1] < content:
        start = out[-1][0] + width - overlap
        out.append((start, min(start + width, content)))
    return out


def split(
    ids: NDArray[np.int64],
    offsets: NDArray[np.int64],
    specials: Specials,
    max_length: int,
    chunking: Chunking,
    prompt: NDArray[np.int64] | None = None,
) -> Windows:
    """Windows of `max_length` tokens (special tokens included) of the untruncated documents `ids`/`offsets`, each
    starting with the `prompt` tokens (the prompt's content tokens, counted once in each document's tokens).
    InvalidArgument naming the text ("text i ...") with which the request passes `chunking.max_windows`."""
    prompt = np.empty(0, np.int64) if prompt is None else prompt
    width = max_length - len(specials) - len(prompt)
    if not 0 <= chunking.overlap < width:
        raise InvalidArgument(
            f"chunk_overlap_tokens {chunking.overlap} must be below the {width} tokens of a window"
            + (f" (the prompt takes {len(prompt)})" if len(prompt) else "")
        )
    head, tail = len(specials.prefix), len(specials.suffix)
    pieces: list[NDArray[np.int64]] = []
    weights: list[int] = []
    counts: list[int] = []
    for d in range(len(offsets) - 1):
        content = ids[offsets[d] + head : offsets[d + 1] - tail]
        windows = spans(len(content), width, chunking.overlap)
        if len(weights) + len(windows) > chunking.max_windows:
            raise InvalidArgument(
                f"text {d} is {len(content)} tokens, {len(windows)} windows: the request would pass its limit of"
                f" {chunking.max_windows} windows (max_windows)"
            )
        for start, end in windows:
            pieces += (specials.prefix, prompt, content[start:end], specials.suffix)
            weights.append(end - start)
        counts.append(len(windows))
    lengths = np.asarray(weights, dtype=np.int64) + len(specials) + len(prompt)
    return Windows(
        ids=np.concatenate(pieces) if pieces else np.empty(0, np.int64),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        weights=np.asarray(weights, dtype=np.float32),
        counts=np.asarray(counts, dtype=np.int64),
        token_counts=np.diff(offsets) + len(prompt),
    )


def pooled(vectors: NDArray[np.float32], windows: Windows) -> NDArray[np.float32]:
    """One unit vector per document: its windows' vectors, weighted by their content tokens, summed, normalised.
    (A window of no content tokens, the one window of an empty text, gets weight 1.)"""
    owners = np.repeat(np.arange(len(windows.counts)), windows.counts)
    weighted = vectors.astype(np.float64) * np.maximum(windows.weights, 1.0)[:, None]
    sums = np.zeros((len(windows.counts), vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, owners, weighted)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    out: NDArray[np.float32] = (sums / np.maximum(norms, 1e-12)).astype(np.float32)
    return out
