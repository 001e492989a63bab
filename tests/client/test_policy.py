"""The client's policies on their own, with a fake clock: splitting, backoff, deadlines, target rotation."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedpool.client.retry import Attempts, Deadline, Failure, RetryPolicy
from embedpool.client.split import field_size, runs
from embedpool.client.targets import Targets, parse_targets
from embedpool.errors import InferenceFailed, InvalidArgument, Overloaded, Unavailable
from embedpool.v1 import embedpool_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


UNAVAILABLE = Failure(grpc.StatusCode.UNAVAILABLE, "down")


@given(st.lists(st.text(max_size=300), max_size=40), st.integers(1, 9), st.integers(1, 900))
def test_runs_keep_order_and_limits(texts: list[str], max_count: int, max_bytes: int) -> None:
    docs = [pb.Document(text=t) for t in texts]
    size = lambda d: field_size(d.ByteSize())  # noqa: E731
    split = list(runs(docs, size, max_count=max_count, max_bytes=max_bytes))
    assert [d for run in split for d in run] == docs
    for run in split:
        assert 1 <= len(run) <= max_count
        assert len(run) == 1 or sum(map(size, run)) <= max_bytes  # only an item too big by itself exceeds
    template = pb.EmbedRequest(collection="c", skip_vectors=True)
    request = pb.EmbedRequest(collection="c", skip_vectors=True, documents=docs)
    assert request.ByteSize() == template.ByteSize() + sum(map(size, docs))  # the sizes are exact


def test_a_full_run_goes_before_the_next_item_is_read() -> None:
    def items() -> Iterator[int]:
        yield from (1, 2)
        raise AssertionError("read too far")

    assert next(runs(items(), lambda _: 1, max_count=2, max_bytes=100)) == [1, 2]


def test_targets_rotate_and_skip_one_cooling_down() -> None:
    clock = Clock()
    targets = Targets(["a", "b", "c"], cooldown=2.0, clock=clock)
    assert [targets.pick() for _ in range(4)] == [0, 1, 2, 0]
    assert targets.unavailable(1)  # others are ready: fail over at once
    assert [targets.pick() for _ in range(4)] == [2, 0, 2, 0]
    clock.now += 2.0
    assert [targets.pick() for _ in range(3)] == [1, 2, 0]


def test_when_every_target_cools_down_the_first_to_recover_is_tried() -> None:
    clock = Clock()
    targets = Targets(["a", "b"], cooldown=2.0, clock=clock)
    assert targets.unavailable(0)
    clock.now += 1.0
    assert not targets.unavailable(1)
    assert targets.pick() == 0
    targets.answered(1)
    assert targets.pick() == 1


def test_parse_targets() -> None:
    assert parse_targets("a:1, b:2,") == ["a:1", "b:2"]
    assert parse_targets(["a:1"]) == ["a:1"]
    with pytest.raises(InvalidArgument):
        parse_targets(" , ")


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    assert [policy.backoff(n, draw=lambda: 1.0) for n in (1, 2, 3, 4, 5, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert policy.backoff(3, draw=lambda: 0.0) == 0.0


def test_attempts_fail_over_at_once_and_back_off_otherwise() -> None:
    clock = Clock()
    targets = Targets(["a", "b"], cooldown=2.0, clock=clock)
    attempts = Attempts(RetryPolicy(initial_backoff=0.1), Deadline(10.0, clock), "Embed", targets)
    assert attempts.target() == 0
    assert attempts.failed(UNAVAILABLE) == 0.0  # b is ready
    assert attempts.target() == 1
    assert 0.0 <= attempts.failed(UNAVAILABLE) <= 0.1  # both cool down: back off
    overloaded = Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", retry_after=3.0)
    assert attempts.target() == 0
    assert attempts.failed(overloaded) == 3.0  # the server's delay is the floor


def test_attempts_never_wait_past_the_deadline() -> None:
    clock = Clock()
    attempts = Attempts(RetryPolicy(), Deadline(1.5, clock), "Embed", Targets(["a"], 2.0, clock))
    attempts.target()
    clock.now += 1.0
    with pytest.raises(Overloaded, match="past the deadline") as raised:
        attempts.failed(Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", retry_after=0.6))
    assert raised.value.retry_after == 0.6


def test_attempts_end_at_their_limit_and_at_a_status_not_retried() -> None:
    targets = Targets(["a", "b"], cooldown=0.0)
    attempts = Attempts(RetryPolicy(max_attempts=2), Deadline(None), "Embed", targets)
    attempts.failed(UNAVAILABLE)
    with pytest.raises(Unavailable, match="after 2 attempts"):
        attempts.failed(UNAVAILABLE)
    attempts.progressed()  # a stream that had batches acknowledged starts again
    attempts.failed(UNAVAILABLE)
    with pytest.raises(InvalidArgument, match="bad"):
        attempts.failed(Failure(grpc.StatusCode.INVALID_ARGUMENT, "bad"))


@pytest.mark.parametrize(
    "details",
    [
        "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))",  # nginx lost its replica
        "Stream removed (Data frame with END_STREAM flag received)",  # HAProxy lost its replica
        "Received RST_STREAM with error code 2",
    ],
)
@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN])
def test_a_stream_cut_on_the_way_is_the_replica_unavailable_and_retried(details: str, code: grpc.StatusCode) -> None:
    """grpc-core's words for a stream a load balancer cut mid-call, as grpc 1.85 reported them behind nginx and
    HAProxy (bench/replicas.py): no server said INTERNAL or UNKNOWN, and the call may be repeated."""
    failure = Failure.of(code, details, ())
    assert failure.code == grpc.StatusCode.UNAVAILABLE
    assert failure.message == details


def test_an_internal_error_the_server_sent_is_not_retried() -> None:
    failure = Failure.of(grpc.StatusCode.INTERNAL, "inference failed (request id 0f3a)", ())
    assert failure.code == grpc.StatusCode.INTERNAL
    attempts = Attempts(RetryPolicy(), Deadline(10.0), "Embed", Targets(["a:1"], cooldown=2.0))
    with pytest.raises(InferenceFailed):
        attempts.failed(failure)
