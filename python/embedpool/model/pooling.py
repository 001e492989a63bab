"""Graph surgery shared by both model paths: turn a graph whose output is token embeddings [batch, seq, hidden]
into one whose only output is `sentence_embedding` float32 [batch, dim] (pooled over the attention mask, then
L2-normalised like sentence-transformers' Normalize module).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from embedpool.errors import InvalidArgument
from embedpool.model.checkpoint import Pooling

SENTENCE_EMBEDDING = "sentence_embedding"
ATTENTION_MASK = "attention_mask"
TOKEN_OUTPUT_NAMES = ("last_hidden_state", "token_embeddings")
# Every node this module adds is named under this prefix, so the fp16 conversion can keep them in fp32.
NODE_PREFIX = "pool/"

_NORM_EPS = 1e-12  # torch.nn.functional.normalize's default, which sentence-transformers uses
_COUNT_EPS = 1e-9  # sentence-transformers' clamp on the token count
_MAX_FILL = -1e9  # sentence-transformers' fill for padded tokens before max pooling


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _output_rank(output: onnx.ValueInfoProto) -> int | None:
    t = output.type.tensor_type
    return len(t.shape.dim) if t.HasField("shape") else None


def pooled_output(model: onnx.ModelProto) -> str | None:
    """The name of an output already shaped [batch, dim] (a pooled embedding), if the graph has one."""
    names = [o.name for o in model.graph.output]
    if SENTENCE_EMBEDDING in names:
        return SENTENCE_EMBEDDING
    pooled = [o.name for o in model.graph.output if _output_rank(o) == 2 and o.name not in TOKEN_OUTPUT_NAMES]
    return pooled[0] if pooled else None


def token_output(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The graph output holding token embeddings: by its conventional name, else the only rank-3 output."""
    outputs = list(model.graph.output)
    named = [o for o in outputs if o.name in TOKEN_OUTPUT_NAMES]
    if named:
        return named[0]
    rank3 = [o for o in outputs if _output_rank(o) == 3]
    if len(rank3) == 1:
        return rank3[0]
    raise InvalidArgument(f"cannot find a token-embedding output among {[o.name for o in outputs]}")


class _Nodes:
    """Appends pool/ nodes, writing axes as an attribute or an input as the model's opset requires."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.opset = _opset(model)
        self.nodes: list[onnx.NodeProto] = []

    def const(self, name: str, value: NDArray[np.generic]) -> str:
        full = NODE_PREFIX + name
        self.model.graph.initializer.append(numpy_helper.from_array(value, full))
        return full

    def op(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> str:
        full = NODE_PREFIX + output
        self.nodes.append(helper.make_node(op_type, inputs, [full], name=f"{full}/{op_type}", **attrs))
        return full

    def _axes_op(self, op_type: str, x: str, axes: list[int], output: str, since: int, **attrs: Any) -> str:
        if self.opset >= since:
            return self.op(op_type, [x, self.const(f"{output}_axes", np.array(axes, dtype=np.int64))], output, **attrs)
        return self.op(op_type, [x], output, axes=axes, **attrs)

    def unsqueeze(self, x: str, axes: list[int], output: str) -> str:
        return self._axes_op("Unsqueeze", x, axes, output, since=13)

    def squeeze(self, x: str, axes: list[int], output: str) -> str:
        return self._axes_op("Squeeze", x, axes, output, since=13)

    def reduce(self, op_type: str, x: str, axes: list[int], output: str, keepdims: int) -> str:
        since = 13 if op_type == "ReduceSum" else 18
        return self._axes_op(op_type, x, axes, output, since=since, keepdims=keepdims)


def _pool(n: _Nodes, tokens: str, mask: str, pooling: Pooling, float_type: int) -> str:
    scalar = helper.tensor_dtype_to_np_dtype(float_type)
    if pooling == "cls":
        return n.op("Gather", [tokens, n.const("cls_index", np.array(0, dtype=np.int64))], "cls", axis=1)
    if pooling == "lasttoken":
        return _last_token(n, tokens, mask)
    mask3 = n.unsqueeze(mask, [-1], "mask_3d")
    if pooling == "max":
        keep = n.op("Cast", [mask3], "mask_bool", to=TensorProto.BOOL)
        fill = n.const("max_fill", np.array(_MAX_FILL, dtype=scalar))
        filled = n.op("Where", [keep, tokens, fill], "max_filled")
        return n.reduce("ReduceMax", filled, [1], "max", keepdims=0)
    weights = n.op("Cast", [mask3], "mask_float", to=float_type)
    summed = n.reduce("ReduceSum", n.op("Mul", [tokens, weights], "masked"), [1], "sum", keepdims=0)
    counts = n.reduce("ReduceSum", weights, [1], "count", keepdims=0)
    counts = n.op("Max", [counts, n.const("count_eps", np.array(_COUNT_EPS, dtype=scalar))], "count_clamped")
    return n.op("Div", [summed, counts], "mean")


def _last_token(n: _Nodes, tokens: str, mask: str) -> str:
    """The last position the mask marks real, as sentence-transformers picks it (position 0 for an empty mask):
    the ArgMax of (position + 1) * mask, so right and left padding both work."""

    def i64(name: str, value: int | list[int]) -> str:
        return n.const(name, np.array(value, dtype=np.int64))

    one = i64("last_one", 1)
    mask_shape = n.op("Shape", [mask], "last_mask_shape")
    seq_end = n.op("Add", [n.op("Gather", [mask_shape, one], "last_seq_len"), one], "last_seq_end")
    numbered = n.op("Mul", [mask, n.op("Range", [one, seq_end, one], "last_numbers")], "last_numbered")
    # ArgMax over int32 (ORT's CPU kernel has no int64 one); its attributes read the same in every opset since 13.
    as_int32 = n.op("Cast", [numbered], "last_numbered_i32", to=TensorProto.INT32)
    index = n.unsqueeze(n.op("ArgMax", [as_int32], "last_index", axis=1, keepdims=1), [-1], "last_index_3d")
    # GatherElements takes an index shaped like its output, [batch, 1, hidden].
    batch = n.op("Gather", [mask_shape, i64("last_batch_axis", [0])], "last_batch")
    hidden = n.op("Gather", [n.op("Shape", [tokens], "last_tokens_shape"), i64("last_hidden_axis", [2])], "last_hidden")
    target = n.op("Concat", [batch, i64("last_one_1d", [1]), hidden], "last_target_shape", axis=0)
    picked = n.op("GatherElements", [tokens, n.op("Expand", [index, target], "last_index_full")], "last_picked", axis=1)
    return n.squeeze(picked, [1], "lasttoken")


def _l2_normalize(n: _Nodes, x: str, float_type: int) -> str:
    squares = n.op("Mul", [x, x], "squares")
    norm = n.op("Sqrt", [n.reduce("ReduceSum", squares, [1], "sum_squares", keepdims=1)], "norm")
    eps = n.const("norm_eps", np.array(_NORM_EPS, dtype=helper.tensor_dtype_to_np_dtype(float_type)))
    return n.op("Div", [x, n.op("Max", [norm, eps], "norm_clamped")], "normalized")


def append_pooling(model: onnx.ModelProto, pooling: Pooling, normalize: bool, dim: int) -> onnx.ModelProto:
    """Return a copy of `model` whose only output is `sentence_embedding` float32 [batch, dim].

    A model that already outputs a pooled [batch, dim] embedding is returned with that output renamed, untouched
    otherwise: pooling twice would be wrong.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if ATTENTION_MASK not in {i.name for i in out.graph.input}:
        raise InvalidArgument(f"model has no '{ATTENTION_MASK}' input to pool over")
    already = pooled_output(out)
    if already is not None:
        return _single_output(out, already, dim, rename=True)

    tokens = token_output(out)
    float_type = tokens.type.tensor_type.elem_type
    n = _Nodes(out)
    result = _pool(n, tokens.name, ATTENTION_MASK, pooling, float_type)
    if normalize:
        result = _l2_normalize(n, result, float_type)
    final = [n.op("Cast", [result], "as_float32", to=TensorProto.FLOAT)] if float_type != TensorProto.FLOAT else []
    out.graph.node.extend(n.nodes)
    src = final[0] if final else result
    out.graph.node.append(helper.make_node("Identity", [src], [SENTENCE_EMBEDDING], name=NODE_PREFIX + "output"))
    return _single_output(out, SENTENCE_EMBEDDING, dim, rename=False)


def _unique_node_name(model: onnx.ModelProto, base: str) -> str:
    taken = {n.name for n in model.graph.node}
    return next(f"{base}{i or ''}" for i in range(len(taken) + 1) if f"{base}{i or ''}" not in taken)


def _single_output(model: onnx.ModelProto, name: str, dim: int, rename: bool) -> onnx.ModelProto:
    if rename and name != SENTENCE_EMBEDDING:
        source = next(o for o in model.graph.output if o.name == name)
        node_name = _unique_node_name(model, NODE_PREFIX + "output")
        if source.type.tensor_type.elem_type == TensorProto.FLOAT:
            node = helper.make_node("Identity", [name], [SENTENCE_EMBEDDING], name=node_name)
        else:
            node = helper.make_node("Cast", [name], [SENTENCE_EMBEDDING], name=node_name, to=TensorProto.FLOAT)
        model.graph.node.append(node)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(SENTENCE_EMBEDDING, TensorProto.FLOAT, ["batch", dim]))
    return model
