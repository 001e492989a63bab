"""The query cache's own rules, without a server: least recently used first out, the byte bound, copies that no
caller can change, which calls and texts it serves, and gauges that follow its contents."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.typing import NDArray
from prometheus_client import REGISTRY

from embedpool.service.query_cache import (
    MAX_CALL_TEXTS,
    MAX_TEXT_CHARS,
    CachedQuery,
    QueryCache,
    QueryKey,
    entry_bytes,
)

DIM = 8
MODEL = "model/fp32"


def key(text: str, truncate: bool = True) -> QueryKey:
    made = QueryCache.key(MODEL, truncate, text)
    assert made is not None
    return made


def vector(seed: int) -> NDArray[np.float32]:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    out: NDArray[np.float32] = v / np.linalg.norm(v)
    return out


def room_for(n: int) -> int:
    """A bound that holds `n` entries of one-character texts, not n + 1."""
    return n * entry_bytes(key("a"), vector(0))


def test_the_least_recently_used_goes_first() -> None:
    cache = QueryCache(room_for(3))
    for i, text in enumerate("abc"):
        cache.put(key(text), vector(i), i)
    assert cache.get(key("a")) is not None  # now the most recently used
    cache.put(key("d"), vector(3), 3)
    assert cache.get(key("b")) is None
    assert [cache.get(key(t)) is not None for t in "acd"] == [True, True, True]
    assert len(cache) == 3 and cache.bytes == room_for(3)


def test_entries_are_read_only_copies() -> None:
    cache = QueryCache(room_for(2))
    source = vector(1)
    cache.put(key("a"), source, 4)
    source[:] = 0  # the caller's array, reused
    entry = cache.get(key("a"))
    assert entry is not None and entry.tokens == 4
    np.testing.assert_array_equal(entry.vector, vector(1))
    with pytest.raises(ValueError, match="read-only"):
        entry.vector[0] = 1.0


def test_options_are_part_of_the_key() -> None:
    cache = QueryCache(room_for(4))
    cache.put(key("a", truncate=True), vector(1), 3)
    assert cache.get(key("a", truncate=False)) is None
    assert cache.get(QueryKey("other/fp32", "", True, "a")) is None
    assert cache.get(QueryKey(MODEL, "query: ", True, "a")) is None


def test_putting_a_key_again_replaces_its_entry_and_counts_it_once() -> None:
    cache = QueryCache(room_for(2))
    cache.put(key("a"), vector(1), 3)
    cache.put(key("a"), vector(2), 3)
    entry = cache.get(key("a"))
    assert entry is not None and len(cache) == 1 and cache.bytes == room_for(1)
    np.testing.assert_array_equal(entry.vector, vector(2))


def test_an_entry_larger_than_the_bound_is_not_kept() -> None:
    cache = QueryCache(room_for(1))
    cache.put(key("a"), vector(1), 3)
    cache.put(key("a much longer text"), vector(2), 3)
    assert len(cache) == 1 and cache.get(key("a")) is not None


def test_which_calls_and_texts_it_serves() -> None:
    assert not QueryCache(0).serves(["a"])
    cache = QueryCache(room_for(1))
    assert cache.serves(["a"] * MAX_CALL_TEXTS) and not cache.serves(["a"] * (MAX_CALL_TEXTS + 1))
    assert QueryCache.key(MODEL, True, "x" * MAX_TEXT_CHARS) is not None
    assert QueryCache.key(MODEL, True, "x" * (MAX_TEXT_CHARS + 1)) is None
    with pytest.raises(ValueError):
        QueryCache(-1)


def _gauges() -> tuple[float, float]:
    held = REGISTRY.get_sample_value("embedpool_query_cache_bytes")
    entries = REGISTRY.get_sample_value("embedpool_query_cache_entries")
    assert held is not None and entries is not None
    return held, entries


_OPS = st.lists(st.tuples(st.booleans(), st.text("abcdef", min_size=1, max_size=3)), max_size=60)


@given(ops=_OPS, capacity=st.integers(1, 6))
def test_it_behaves_as_a_bounded_lru_and_the_gauges_follow(ops: list[tuple[bool, str]], capacity: int) -> None:
    """Against a plain model: an ordered dict of the texts, most recent last, cut from the front to the bound."""
    bound = room_for(capacity) + 5  # a little slack: texts of 1..3 characters differ in size
    cache = QueryCache(bound)
    model: OrderedDict[str, int] = OrderedDict()
    gauges_before = _gauges()
    for n, (put, text) in enumerate(ops):
        if put:
            cache.put(key(text), vector(n), n)
            model.pop(text, None)
            model[text] = n
            while sum(entry_bytes(key(t), vector(0)) for t in model) > bound:
                model.popitem(last=False)
        else:
            entry = cache.get(key(text))
            assert (entry is not None) == (text in model)
            if entry is not None:
                assert entry.tokens == model[text]
                model.move_to_end(text)
        assert len(cache) == len(model) and cache.bytes <= bound
        assert cache.bytes == sum(entry_bytes(key(t), vector(0)) for t in model)
    held, entries = _gauges()
    assert (held - gauges_before[0], entries - gauges_before[1]) == (cache.bytes, len(cache))


def test_a_flight_has_one_leader_and_lands_once_for_everyone_waiting() -> None:
    cache = QueryCache(room_for(4))
    joined = REGISTRY.get_sample_value("embedpool_query_cache_joined_total") or 0.0
    flight, leading = cache.flight(key("popular"))
    again, second = cache.flight(key("popular"))
    other, third = cache.flight(key("popular", truncate=False))  # other options: another text to embed
    assert leading and not second and third and again is flight and other is not flight
    assert REGISTRY.get_sample_value("embedpool_query_cache_joined_total") == joined + 1
    entry = CachedQuery(vector(1), 3)
    cache.land(flight, entry)
    assert flight.done.is_set() and flight.entry is entry
    landed, leads = cache.flight(key("popular"))  # landed flights are gone: the next miss leads a new one
    assert leads and landed is not flight
    cache.land(landed, None)  # a failed leader: those waiting embed the text themselves
    assert landed.done.is_set() and landed.entry is None
    cache.land(other, None)
    assert cache.flight(key("popular", truncate=False))[1]
