"""The built-in real-text corpus: passages cut from the docstrings of the installed Python standard library.

The same passages as `bench/corpus.py` (a verbatim copy of the project's shared script, which the bench scripts and
the golden data use): deterministic for a given Python version, paragraphs merged up to a word budget, so that
lengths vary the way real documents do. Shipped in the package so that an installed `embedpool bench` has it.
"""

from __future__ import annotations

import ast
import functools
import os
import random
import sysconfig
from collections.abc import Iterator

__all__ = ["docstrings", "passages"]


def docstrings() -> Iterator[str]:
    """Module, class and function docstrings of the standard library, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "site-packages", "idlelib"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except Exception:  # a file this Python cannot parse (or read) is not part of the corpus
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    doc = ast.get_docstring(node)
                    if doc:
                        yield doc


@functools.cache
def _passages(n: int, max_words: int, seed: int) -> tuple[str, ...]:
    rng = random.Random(seed)
    out: list[str] = []
    cur: list[str] = []
    budget = rng.randint(8, max_words)
    for doc in docstrings():
        for para in doc.split("\n\n"):
            words = para.split()
            if not words:
                continue
            cur.extend(words)
            if len(cur) >= budget:
                out.append(" ".join(cur[:budget]))
                cur = []
                budget = rng.randint(8, max_words)
                if len(out) >= n:
                    return tuple(out)
    if cur:
        out.append(" ".join(cur))
    return tuple(out)


def passages(n: int = 20000, max_words: int = 200, seed: int = 0) -> list[str]:
    """Up to `n` passages of 8..`max_words` words (the standard library has a few thousand); cached per process,
    since reading the library takes seconds."""
    return list(_passages(n, max_words, seed))
