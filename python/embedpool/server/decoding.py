"""Registers the Embedder servicer with request decoding that reports malformed bytes as the caller's mistake.

The generated `add_EmbedderServicer_to_server` decodes with `Message.FromString` inside grpc, where a
DecodeError becomes UNKNOWN ("Unexpected <class DecodeError>"). Here bytes that do not parse decode to a
`Malformed` marker instead, which the rpc wrapper answers with INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message

from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

__all__ = ["Malformed", "add_embedder"]


@dataclass(frozen=True, slots=True)
class Malformed:
    """What a request that failed to parse decodes to."""

    message_type: str


def _decoder(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    name = cls.DESCRIPTOR.name

    def decode(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except (DecodeError, RecursionError):  # RecursionError: nesting deeper than the parser allows
            return Malformed(name)

    return decode


_HANDLER_FOR_SHAPE: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_embedder(servicer: pb_grpc.EmbedderServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_EmbedderServicer_to_server, every method of the service, with `_decoder`."""
    service = pb.DESCRIPTOR.services_by_name["Embedder"]
    handlers = {}
    for method in service.methods:
        request: type[Message] = getattr(pb, method.input_type.name)
        response: type[Message] = getattr(pb, method.output_type.name)
        shape = _HANDLER_FOR_SHAPE[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = shape(
            getattr(servicer, method.name),
            request_deserializer=_decoder(request),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]  # not in grpc-stubs
