"""Wire conversions that must agree with protobuf's own: Struct -> dict (hypothesis against MessageToDict)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from embedpool.errors import InvalidArgument
from embedpool.server.codec import dict_to_struct, struct_to_dict

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(-(2**53), 2**53)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), _json, max_size=6))
def test_struct_to_dict_is_message_to_dict(value: dict[str, Any]) -> None:
    message = dict_to_struct(value)
    ours = struct_to_dict(message)
    assert ours == json_format.MessageToDict(message)
    assert repr(ours) == repr(json_format.MessageToDict(message))  # same types too: 1.0 stays a float


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_a_number_json_cannot_carry_is_invalid(number: float) -> None:
    message = struct_pb2.Struct()
    message.fields["x"].number_value = number
    with pytest.raises(InvalidArgument, match="not a JSON number"):
        struct_to_dict(message)
    nested = struct_pb2.Struct()
    nested.fields["list"].list_value.values.add().number_value = number
    with pytest.raises(InvalidArgument):
        struct_to_dict(nested)


def test_an_unset_value_is_null() -> None:
    message = struct_pb2.Struct()
    message.fields["empty"].SetInParent()
    assert struct_to_dict(message) == json_format.MessageToDict(message) == {"empty": None}
