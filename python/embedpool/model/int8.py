"""The int8 variant: the fused fp32 graph with its weight MatMuls run as u8 x s8 integer GEMMs whose activations are
quantized per token.

Each token row gets its own scale, computed from that row alone, so a text's vector never depends on its batch-mates
or on how much padding the batch carries. ORT's dynamic quantization (DynamicQuantizeLinear, QAttention) scales the
whole [batch, seq, hidden] tensor at once: a text embedded alone and inside a batch differed by up to 1.3% cosine.
Per-token scales also confine BERT's outlier tokens ([CLS] reaches ~30) to their own row, which is what lets the
feed-forward MatMuls be quantized at all (per tensor they cost 3.5% cosine; see bench/quantize.py).

Weights are symmetric int8 per output column; activations are uint8 because ORT's VNNI kernels take u8 x s8 (s8 x s8
ran at a third of fp32 speed). The fused Attention keeps fp32 weights: un-fusing it into an integer QKV projection and
MultiHeadAttention was slower than the fused fp32 op.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

# Blocked QuantizeLinear (one scale per token row) first appears in opset 21.
OPSET = 21
PREFIX = "int8/"
# Exact GELU never goes below -0.16997 (at x = -0.75): shifted by this, its output is non-negative.
GELU_FLOOR = 0.17
_GELU_OPS = frozenset({"Gelu", "BiasGelu", "FastGelu"})
# Reductions whose axes moved from an attribute to an input in opset 18 (ReduceSum moved in 13).
_AXES_INPUT_SINCE_18 = frozenset(
    {
        "ReduceMax",
        "ReduceMin",
        "ReduceMean",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    }
)

# How a MatMul's input is mapped to uint8:
#   "symmetric": scale = max|x| / 127 around a fixed zero point of 128 (inputs centred on zero);
#   "asymmetric": the row's [min, max] over 0..255, its zero point corrected for after the GEMM;
#   "shifted": GELU outputs plus GELU_FLOOR over 0..255, the shift folded into a constant.
Mode = Literal["symmetric", "asymmetric", "shifted"]


@dataclass
class _Builder:
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def const(self, name: str, value: NDArray[np.generic]) -> str:
        self.initializers.append(numpy_helper.from_array(value, PREFIX + name))
        return PREFIX + name

    def node(self, op: str, inputs: Iterable[str], name: str, domain: str = "", **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [PREFIX + name], PREFIX + name, domain=domain, **attrs))
        return PREFIX + name


def _quantize_weight(w: NDArray[np.float32]) -> tuple[NDArray[np.int8], NDArray[np.float32]]:
    """[K, N] float -> symmetric int8 per output column, and the column scales."""
    scale = np.maximum(np.abs(w).max(axis=0), np.float32(1e-12)) / np.float32(127)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def _row_scale(b: _Builder, name: str, span: str, levels: float) -> str:
    """[batch, seq, 1] scale = span / levels, kept off zero for all-zero rows."""
    scaled = b.node("Mul", [span, b.const(f"{name}/inv_levels", np.array(1 / levels, np.float32))], f"{name}/s0")
    return b.node("Max", [scaled, b.const(f"{name}/tiny", np.array(1e-12, np.float32))], f"{name}/scale")


def _quantized_matmul(b: _Builder, x: str, w: NDArray[np.float32], out: str, mode: Mode) -> None:
    """Nodes computing `out` = x @ w ([batch, seq, K] @ [K, N]) with per-token uint8 activations."""
    k = w.shape[0]
    name = out.replace(":", "_")
    axes = b.const(f"{name}/axes", np.array([-1], np.int64))
    wq, w_scale = _quantize_weight(w)
    weight, ones = b.const(f"{name}/w", wq), b.const(f"{name}/one", np.array(1.0, np.float32))
    col_scale = b.const(f"{name}/w_scale", w_scale)
    zero_point = ""
    correction: str | None = None
    if mode == "symmetric":
        amax = b.node("ReduceMax", [b.node("Abs", [x], f"{name}/abs"), axes], f"{name}/amax", keepdims=1)
        scale = _row_scale(b, name, amax, 127)
        mid = b.const(f"{name}/u8_mid", np.array(128, np.uint8))
        row_zp = b.node("Expand", [mid, b.node("Shape", [scale], f"{name}/shape")], f"{name}/row_zp")
        q = b.node("QuantizeLinear", [x, scale, row_zp], f"{name}/q", axis=-1, block_size=k)
        zero_point = mid
    elif mode == "shifted":
        shifted = b.node("Add", [x, b.const(f"{name}/floor", np.array(GELU_FLOOR, np.float32))], f"{name}/shifted")
        scale = _row_scale(b, name, b.node("ReduceMax", [shifted, axes], f"{name}/max", keepdims=1), 255)
        q = b.node("QuantizeLinear", [shifted, scale], f"{name}/q", axis=-1, block_size=k)
        # x @ w = (x + floor) @ w - floor * colsum(w): a constant row, added after the GEMM.
        colsum = (wq.astype(np.float64) * w_scale).sum(axis=0)
        correction = b.const(f"{name}/unshift", (-GELU_FLOOR * colsum).astype(np.float32))
    else:
        zero = b.const(f"{name}/zero", np.array(0.0, np.float32))
        lo = b.node("Min", [b.node("ReduceMin", [x, axes], f"{name}/min", keepdims=1), zero], f"{name}/lo")
        hi = b.node("Max", [b.node("ReduceMax", [x, axes], f"{name}/max", keepdims=1), zero], f"{name}/hi")
        scale = _row_scale(b, name, b.node("Sub", [hi, lo], f"{name}/span"), 255)
        row_zp_f = b.node(
            "Round", [b.node("Div", [b.node("Neg", [lo], f"{name}/neg_lo"), scale], f"{name}/zp_f")], f"{name}/zp_r"
        )
        row_zp = b.node("Cast", [row_zp_f], f"{name}/row_zp", to=TensorProto.UINT8)
        q = b.node("QuantizeLinear", [x, scale, row_zp], f"{name}/q", axis=-1, block_size=k)
        # MatMulInteger takes one zero point per tensor: subtract zp[row] * colsum(w) * scale[row] afterwards.
        colsum = b.const(f"{name}/colsum", (wq.astype(np.float64) * w_scale).sum(axis=0).astype(np.float32))
        offset = b.node(
            "Mul", [b.node("Cast", [row_zp], f"{name}/zp_float", to=TensorProto.FLOAT), scale], f"{name}/zp_x"
        )
        correction = b.node("Neg", [b.node("Mul", [offset, colsum], f"{name}/zp_rows")], f"{name}/unshift_rows")
    # (q - zero_point) @ wq * w_scale, then * the row's scale (MatMulIntegerToFloat takes per-tensor A scales only).
    gemm = b.node(
        "MatMulIntegerToFloat",
        [q, weight, ones, col_scale, zero_point],
        f"{name}/gemm",
        domain="com.microsoft",
    )
    if correction is None:
        b.nodes.append(helper.make_node("Mul", [gemm, scale], [out], PREFIX + f"{name}/rescale"))
    else:
        rescaled = b.node("Mul", [gemm, scale], f"{name}/rescale")
        b.nodes.append(helper.make_node("Add", [rescaled, correction], [out], PREFIX + f"{name}/out"))


def _input_mode(producer: onnx.NodeProto | None, asymmetric: bool) -> Mode:
    if producer is not None and producer.op_type in _GELU_OPS:
        return "shifted"
    return "asymmetric" if asymmetric else "symmetric"


def quantize_per_token(model: onnx.ModelProto, *, asymmetric: bool = False) -> onnx.ModelProto:
    """A copy of the fused fp32 `model` with every MatMul by a weight initializer quantized per token.

    `asymmetric` maps non-GELU inputs over each row's [min, max] rather than +-max|x| (a little closer to fp32, two
    more passes over each output)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    weights = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    b = _Builder()
    replaced: set[str] = set()
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
            if w.ndim == 2:
                mode = _input_mode(producers.get(node.input[0]), asymmetric)
                _quantized_matmul(b, node.input[0], w, node.output[0], mode)
                replaced.add(node.input[1])
                continue
        b.nodes.append(node)
    del graph.node[:]
    graph.node.extend(b.nodes)
    still_used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name not in replaced or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *b.initializers])
    for opset in out.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, OPSET)
    _axes_as_inputs(graph)
    return out


def _axes_as_inputs(graph: onnx.GraphProto) -> None:
    """Rewrite opset-17 reductions (max pooling's ReduceMax) for the opset 21 the graph now declares."""
    for node in graph.node:
        axes = next((a for a in node.attribute if a.name == "axes"), None)
        if node.domain in ("", "ai.onnx") and node.op_type in _AXES_INPUT_SINCE_18 and axes is not None:
            name = f"{PREFIX}{node.name or node.output[0]}/axes"
            graph.initializer.append(numpy_helper.from_array(np.array(list(axes.ints), dtype=np.int64), name))
            node.attribute.remove(axes)
            node.input.append(name)
