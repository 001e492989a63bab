"""Request bytes that do not parse are the caller's mistake: INVALID_ARGUMENT, never UNKNOWN or INTERNAL."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import given, settings
from hypothesis import strategies as st

from embedpool.v1 import embedpool_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Embedder"]
UNARY = [m for m in SERVICE.methods if not m.client_streaming]
# A length-delimited field 1 claiming more bytes than follow: no message type parses it.
TRUNCATED = b"\x0a\x05ab"


def _parses(method_input: str, data: bytes) -> bool:
    cls: type[Message] = getattr(pb, method_input)
    try:
        cls.FromString(data)
    except DecodeError:
        return False
    return True


@pytest.mark.parametrize("method", UNARY, ids=lambda m: m.name)
def test_unparseable_unary_request_is_invalid_argument(channel: grpc.Channel, method: MethodDescriptor) -> None:
    # grpc-stubs require the serializers; grpc defaults them to None, which sends these bytes as they are.
    call = channel.unary_unary(f"/{SERVICE.full_name}/{method.name}")  # type: ignore[call-arg]
    with pytest.raises(grpc.RpcError) as err:
        call(TRUNCATED, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid" in (err.value.details() or "")


def test_unparseable_message_in_a_stream_ends_it_with_invalid_argument(channel: grpc.Channel) -> None:
    # grpc-stubs require the serializers; grpc defaults them to None, which sends these bytes as they are.
    call = channel.stream_stream(f"/{SERVICE.full_name}/Ingest")  # type: ignore[call-arg]
    with pytest.raises(grpc.RpcError) as err:
        list(call(iter([TRUNCATED]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@settings(max_examples=150)
@given(method=st.sampled_from(UNARY), data=st.binary(max_size=64))
def test_random_bytes_never_get_unknown_or_internal(
    channel: grpc.Channel, method: MethodDescriptor, data: bytes
) -> None:
    # grpc-stubs require the serializers; grpc defaults them to None, which sends these bytes as they are.
    call = channel.unary_unary(f"/{SERVICE.full_name}/{method.name}")  # type: ignore[call-arg]
    try:
        call(data, timeout=10)
    except grpc.RpcError as e:
        assert e.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), e.details()
        if not _parses(method.input_type.name, data):
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
