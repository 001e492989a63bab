"""Build a BERT-family encoder (BERT, RoBERTa, XLM-R, MPNet) as an ONNX graph straight from safetensors weights
(no PyTorch).

The node pattern copies what `torch.onnx.export` of a Hugging Face BertModel produces, because ONNX Runtime's
transformer optimizer recognises exactly that pattern and fuses it into EmbedLayerNormalization, Attention,
SkipLayerNormalization and BiasGelu; those fused kernels are what make the CUDA path fast. The other families
differ only in their embeddings (positions) and, for MPNet, a relative position bias on the attention scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from safetensors import SafetensorError, safe_open

from embedpool.errors import InvalidArgument
from embedpool.model.checkpoint import ModelConfig
from embedpool.model.families import Family, canonical_key, family_of
from embedpool.model.relative_bias import NUM_BUCKETS, bucket_table

OPSET = 17  # first opset with LayerNormalization, which the fusions anchor on
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_EMBEDDINGS = "last_hidden_state"
BATCH, SEQ = "batch", "seq"

# HF's additive mask value for padded keys; the Attention fusion recognises it (and -inf-like values).
_MASK_FILTER = -10000.0
_SUPPORTED_ACTIVATIONS = ("gelu",)

Weights = dict[str, NDArray[np.float32]]
# protobuf serialises no message over 2 GiB, and converted models are single ONNX files (no external data).
_MAX_WEIGHT_BYTES = 2**31 - 2**26


def load_weights(path: Path, family: Family) -> Weights:
    """Every float tensor of a checkpoint, keyed as BertModel names them (see families.canonical_key)."""
    try:
        with safe_open(str(path), framework="np") as f:
            size = sum(4 * math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
            if size > _MAX_WEIGHT_BYTES:
                raise InvalidArgument(
                    f"unsupported size: {path} holds {size / 2**30:.1f} GiB of float32 weights, more than one ONNX"
                    " file can (models past 2 GiB need external data, which the converter does not write)"
                )
            return {
                canonical_key(k, family): np.asarray(f.get_tensor(k), dtype=np.float32)
                for k in f.keys()  # noqa: SIM118 -- safe_open is not a mapping
                if not k.endswith("position_ids")
            }
    except FileNotFoundError:
        raise InvalidArgument(f"checkpoint weights missing: {path}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidArgument(f"checkpoint {path} is truncated or not a safetensors file: {exc}") from exc


@dataclass
class _GraphBuilder:
    """Collects nodes and initializers; names each node after the value it produces."""

    weights: Weights
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    _const_names: set[str] = field(default_factory=set)

    def tensor(self, key: str) -> NDArray[np.float32]:
        try:
            return self.weights[key]
        except KeyError:
            raise InvalidArgument(f"checkpoint lacks tensor '{key}'") from None

    def weight(self, key: str, transpose: bool = False) -> str:
        if key in self._const_names:
            return key
        value = self.tensor(key)
        if transpose:
            value = np.ascontiguousarray(value.T)
        return self.const(key, value)

    def const(self, name: str, value: NDArray[np.generic]) -> str:
        if name not in self._const_names:
            self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
            self._const_names.add(name)
        return name

    def i64(self, name: str, values: list[int]) -> str:
        return self.const(name, np.array(values, dtype=np.int64))

    def f32(self, name: str, value: float) -> str:
        return self.const(name, np.array(value, dtype=np.float32))

    def op(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"{output}/{op_type}", **attrs))
        return output


def supported_family(config: ModelConfig) -> Family:
    """The config's family, or InvalidArgument naming what this builder cannot reproduce."""
    family = family_of(config.model_type)
    if config.hidden_act not in _SUPPORTED_ACTIVATIONS:
        raise InvalidArgument(f"hidden_act {config.hidden_act!r} is not supported (only {_SUPPORTED_ACTIVATIONS})")
    if config.position_embedding_type != "absolute":
        raise InvalidArgument(
            f"unsupported position_embedding_type {config.position_embedding_type!r} (only 'absolute')"
        )
    return family


def _embeddings(g: _GraphBuilder, config: ModelConfig, family: Family) -> str:
    if family.offset_positions:
        return _offset_embeddings(g, config, family)
    return _bert_embeddings(g, config)


def _offset_embeddings(g: _GraphBuilder, config: ModelConfig, family: Family) -> str:
    # RoBERTa's create_position_ids_from_input_ids, over the mask rather than pad ids: padding_idx + the running
    # count of real tokens, padding_idx on padding. The same for any padding layout and whatever id pads.
    table = g.tensor("embeddings.position_embeddings.weight")
    if family.token_types:
        table = table + g.tensor("embeddings.token_type_embeddings.weight")[0]
    pos_table = g.const("embeddings.position_embeddings.weight+token_type_0", table.astype(np.float32))
    counts = g.op("CumSum", [ATTENTION_MASK, g.const("const/one", np.array(1, dtype=np.int64))], "emb/token_counts")
    real_counts = g.op("Mul", [counts, ATTENTION_MASK], "emb/real_counts")
    padding_idx = g.const("const/padding_idx", np.array(config.padding_idx, dtype=np.int64))
    pos_ids = g.op("Add", [real_counts, padding_idx], "emb/position_ids")
    words = g.op("Gather", [g.weight("embeddings.word_embeddings.weight"), INPUT_IDS], "emb/words")
    positions = g.op("Gather", [pos_table, pos_ids], "emb/positions")
    summed = g.op("Add", [words, positions], "emb/sum")
    return _layer_norm(g, summed, "embeddings.LayerNorm", "emb/out", config)


def _bert_embeddings(g: _GraphBuilder, config: ModelConfig) -> str:
    # token_type_ids are all zero for sentence embeddings: folding row 0 of the token-type table into the position
    # table gives the same sum without a third input, and leaves the word+position pattern the fusion expects.
    positions = (
        g.tensor("embeddings.position_embeddings.weight") + g.tensor("embeddings.token_type_embeddings.weight")[0]
    )
    pos_table = g.const("embeddings.position_embeddings.weight+token_type_0", positions.astype(np.float32))
    position_ids = g.const("embeddings.position_ids", np.arange(config.max_position_embeddings, dtype=np.int64)[None])

    words = g.op("Gather", [g.weight("embeddings.word_embeddings.weight"), INPUT_IDS], "emb/words")
    shape = g.op("Shape", [INPUT_IDS], "emb/input_shape")
    seq_len = g.op("Gather", [shape, g.const("const/one", np.array(1, dtype=np.int64))], "emb/seq_len")
    seq_end = g.op("Unsqueeze", [seq_len, g.i64("const/axes0", [0])], "emb/seq_end")
    zero, axis1 = g.i64("const/starts0", [0]), g.i64("const/axes1", [1])
    pos_ids = g.op("Slice", [position_ids, zero, seq_end, axis1, g.i64("const/steps1", [1])], "emb/position_ids")
    positions_out = g.op("Gather", [pos_table, pos_ids], "emb/positions")
    summed = g.op("Add", [words, positions_out], "emb/sum")
    return _layer_norm(g, summed, "embeddings.LayerNorm", "emb/out", config)


def _layer_norm(g: _GraphBuilder, x: str, prefix: str, out: str, config: ModelConfig) -> str:
    inputs = [x, g.weight(f"{prefix}.weight"), g.weight(f"{prefix}.bias")]
    return g.op("LayerNormalization", inputs, out, axis=-1, epsilon=config.layer_norm_eps)


def _linear(g: _GraphBuilder, x: str, prefix: str, out: str) -> str:
    product = g.op("MatMul", [x, g.weight(f"{prefix}.weight", transpose=True)], f"{out}/matmul")
    return g.op("Add", [g.weight(f"{prefix}.bias"), product], out)


def _additive_mask(g: _GraphBuilder) -> str:
    """[batch, 1, 1, seq] float: 0 where attended, -10000 where padded (shared by every layer)."""
    unsq1 = g.op("Unsqueeze", [ATTENTION_MASK, g.i64("const/axes1", [1])], "mask/unsqueeze1")
    unsq2 = g.op("Unsqueeze", [unsq1, g.i64("const/axes2", [2])], "mask/unsqueeze2")
    as_float = g.op("Cast", [unsq2], "mask/float", to=TensorProto.FLOAT)
    inverted = g.op("Sub", [g.f32("const/f_one", 1.0), as_float], "mask/inverted")
    return g.op("Mul", [inverted, g.f32("const/mask_filter", _MASK_FILTER)], "mask/additive")


def _position_bias(g: _GraphBuilder, mask: str, config: ModelConfig) -> str:
    """MPNet: mask + the bucketed relative position bias [batch, heads, seq, seq], once for every layer."""
    table = g.tensor("encoder.relative_attention_bias.weight")
    if table.ndim != 2 or table.shape[0] < NUM_BUCKETS or table.shape[1] != config.num_heads:
        raise InvalidArgument(
            f"encoder.relative_attention_bias.weight has shape {table.shape}, expected"
            f" [>= {NUM_BUCKETS}, {config.num_heads}]"
        )
    shape = g.op("Shape", [INPUT_IDS], "bias/input_shape")
    seq_len = g.op("Gather", [shape, g.const("const/one", np.array(1, dtype=np.int64))], "bias/seq_len")
    zero, one = g.const("const/zero", np.array(0, dtype=np.int64)), "const/one"
    steps = g.op("Range", [zero, seq_len, one], "bias/positions")
    keys = g.op("Unsqueeze", [steps, g.i64("const/axes0", [0])], "bias/keys")
    queries = g.op("Unsqueeze", [steps, g.i64("const/axes1", [1])], "bias/queries")
    relative = g.op("Sub", [keys, queries], "bias/relative")
    # bucket_table is indexed from the most negative distance the position table allows.
    offset = g.const("const/relative_offset", np.array(config.max_positions - 1, dtype=np.int64))
    index = g.op("Add", [relative, offset], "bias/bucket_index")
    buckets = g.op("Gather", [g.const("bias/bucket_table", bucket_table(config.max_positions)), index], "bias/buckets")
    per_pair = g.op("Gather", [g.weight("encoder.relative_attention_bias.weight"), buckets], "bias/values")
    per_head = g.op("Transpose", [per_pair], "bias/per_head", perm=[2, 0, 1])
    bias = g.op("Unsqueeze", [per_head, g.i64("const/axes0", [0])], "bias/bias")
    return g.op("Add", [bias, mask], "bias/with_mask")


def _heads(g: _GraphBuilder, x: str, out: str, perm: list[int], config: ModelConfig) -> str:
    split_shape = g.i64("const/split_heads", [0, 0, config.num_heads, config.head_dim])
    reshaped = g.op("Reshape", [x, split_shape], f"{out}/reshape")
    return g.op("Transpose", [reshaped], out, perm=perm)


def _attention(g: _GraphBuilder, x: str, mask: str, layer: int, config: ModelConfig) -> str:
    p, n = f"encoder.layer.{layer}.attention", f"l{layer}/attn"
    q = _heads(g, _linear(g, x, f"{p}.self.query", f"{n}/q"), f"{n}/q_heads", [0, 2, 1, 3], config)
    k = _heads(g, _linear(g, x, f"{p}.self.key", f"{n}/k"), f"{n}/k_heads_t", [0, 2, 3, 1], config)
    v = _heads(g, _linear(g, x, f"{p}.self.value", f"{n}/v"), f"{n}/v_heads", [0, 2, 1, 3], config)
    scores = g.op("MatMul", [q, k], f"{n}/scores")
    scaled = g.op("Div", [scores, g.f32("const/sqrt_head_dim", math.sqrt(config.head_dim))], f"{n}/scaled")
    masked = g.op("Add", [scaled, mask], f"{n}/masked")
    probs = g.op("Softmax", [masked], f"{n}/probs", axis=-1)
    context = g.op("MatMul", [probs, v], f"{n}/context")
    merged_t = g.op("Transpose", [context], f"{n}/context_t", perm=[0, 2, 1, 3])
    merged = g.op("Reshape", [merged_t, g.i64("const/merge_heads", [0, 0, config.hidden])], f"{n}/merged")
    projected = _linear(g, merged, f"{p}.output.dense", f"{n}/out")
    residual = g.op("Add", [projected, x], f"{n}/residual")
    return _layer_norm(g, residual, f"{p}.output.LayerNorm", f"{n}/norm", config)


def _gelu(g: _GraphBuilder, x: str, out: str) -> str:
    # Erf form, the exact GELU BERT was trained with (not the tanh approximation).
    scaled = g.op("Div", [x, g.f32("const/sqrt2", math.sqrt(2.0))], f"{out}/div")
    erf = g.op("Erf", [scaled], f"{out}/erf")
    shifted = g.op("Add", [erf, g.f32("const/f_one", 1.0)], f"{out}/add")
    gated = g.op("Mul", [x, shifted], f"{out}/mul")
    return g.op("Mul", [gated, g.f32("const/half", 0.5)], out)


def _feed_forward(g: _GraphBuilder, x: str, layer: int, config: ModelConfig) -> str:
    p, n = f"encoder.layer.{layer}", f"l{layer}/ffn"
    hidden = _gelu(g, _linear(g, x, f"{p}.intermediate.dense", f"{n}/up"), f"{n}/gelu")
    down = _linear(g, hidden, f"{p}.output.dense", f"{n}/down")
    residual = g.op("Add", [down, x], f"{n}/residual")
    return _layer_norm(g, residual, f"{p}.output.LayerNorm", f"{n}/norm", config)


def build_encoder(weights: Weights, config: ModelConfig) -> onnx.ModelProto:
    """Encoder: input_ids, attention_mask int64 [batch, seq] -> last_hidden_state float32 [batch, seq, hidden]."""
    family = supported_family(config)
    g = _GraphBuilder(weights)
    x = _embeddings(g, config, family)
    mask = _additive_mask(g)
    if family.relative_bias:
        mask = _position_bias(g, mask, config)
    for layer in range(config.num_layers):
        x = _feed_forward(g, _attention(g, x, mask, layer, config), layer, config)
    g.nodes[-1].output[0] = TOKEN_EMBEDDINGS  # the last LayerNorm's output is the graph output, no Identity
    graph = helper.make_graph(
        g.nodes,
        "bert_encoder",
        inputs=[
            helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, [BATCH, SEQ]),
            helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, [BATCH, SEQ]),
        ],
        outputs=[helper.make_tensor_value_info(TOKEN_EMBEDDINGS, TensorProto.FLOAT, [BATCH, SEQ, config.hidden])],
        initializer=g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="embedpool")
    model.ir_version = 8  # readable by every ONNX Runtime since 1.14
    return model


def encoder_from_checkpoint(weights_path: Path, config: ModelConfig) -> onnx.ModelProto:
    return build_encoder(load_weights(weights_path, supported_family(config)), config)
