"""A float64 numpy forward pass of HF's BertModel, RobertaModel / XLMRobertaModel and MPNetModel, followed by
sentence-transformers' Pooling and Normalize: the reference converted graphs are checked against.

It reads the checkpoint's own tensor names (MPNet's attn.q/k/v/o included), so it checks the converter's renaming
too, and it shares no code with embedpool.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]
_MASKED = -1e30  # HF fills padded keys with the dtype's minimum; any value that zeroes their softmax share will do
_erf = np.vectorize(math.erf)


def _layer_norm(x: F64, w: Mapping[str, F64], prefix: str, eps: float) -> F64:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return np.asarray((x - mean) / np.sqrt(var + eps) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"])


def _linear(x: F64, w: Mapping[str, F64], prefix: str) -> F64:
    return np.asarray(x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"])


def _gelu(x: F64) -> F64:
    return np.asarray(0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))))


def _softmax(x: F64) -> F64:
    e = np.exp(x - x.max(-1, keepdims=True))
    return np.asarray(e / e.sum(-1, keepdims=True))


def mpnet_bucket(relative: NDArray[np.int64], num_buckets: int = 32, max_distance: int = 128) -> NDArray[np.int64]:
    """HF's MPNetEncoder.relative_position_bucket."""
    n = -relative
    num_buckets //= 2
    ret = (n < 0).astype(np.int64) * num_buckets
    n = np.abs(n)
    max_exact = num_buckets // 2
    scaled = np.log(np.maximum(n, 1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return np.asarray(ret + np.where(n < max_exact, n, large))


def _embeddings(w: Mapping[str, F64], cfg: Mapping[str, Any], ids: NDArray[np.int64], mask: NDArray[np.int64]) -> F64:
    if cfg["model_type"] == "bert":
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    else:  # create_position_ids_from_input_ids, with the mask marking the real tokens
        padding_idx = 1 if cfg["model_type"] == "mpnet" else cfg["pad_token_id"]  # MPNetEmbeddings fixes it at 1
        positions = np.cumsum(mask, axis=1) * mask + padding_idx
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][positions]
    if cfg["model_type"] != "mpnet":
        x = x + w["embeddings.token_type_embeddings.weight"][0]
    return _layer_norm(x, w, "embeddings.LayerNorm", cfg["layer_norm_eps"])


def _layer_names(model_type: str, layer: int) -> dict[str, str]:
    p = f"encoder.layer.{layer}"
    if model_type == "mpnet":
        attn = f"{p}.attention.attn"
        return {
            "q": f"{attn}.q",
            "k": f"{attn}.k",
            "v": f"{attn}.v",
            "o": f"{attn}.o",
            "ln": f"{p}.attention.LayerNorm",
        }
    s = f"{p}.attention.self"
    return {
        "q": f"{s}.query",
        "k": f"{s}.key",
        "v": f"{s}.value",
        "o": f"{p}.attention.output.dense",
        "ln": f"{p}.attention.output.LayerNorm",
    }


def encode(
    weights: Mapping[str, NDArray[np.float32]], cfg: Mapping[str, Any], ids: NDArray[np.int64], mask: NDArray[np.int64]
) -> F64:
    """Token embeddings [batch, seq, hidden] (weights named without a task-head prefix)."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    heads, eps = cfg["num_attention_heads"], cfg["layer_norm_eps"]
    batch, seq = ids.shape
    head_dim = cfg["hidden_size"] // heads
    x = _embeddings(w, cfg, ids, mask)
    scores_bias = (1.0 - mask[:, None, None, :]) * _MASKED
    if cfg["model_type"] == "mpnet":
        steps = np.arange(seq)
        buckets = mpnet_bucket(steps[None, :] - steps[:, None])
        scores_bias = scores_bias + w["encoder.relative_attention_bias.weight"][buckets].transpose(2, 0, 1)[None]

    def split(t: F64) -> F64:
        return np.asarray(t.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3))

    for layer in range(cfg["num_hidden_layers"]):
        n = _layer_names(cfg["model_type"], layer)
        q, k, v = (split(_linear(x, w, n[name])) for name in "qkv")
        probs = _softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + scores_bias)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        x = _layer_norm(_linear(context, w, n["o"]) + x, w, n["ln"], eps)
        p = f"encoder.layer.{layer}"
        up = _gelu(_linear(x, w, f"{p}.intermediate.dense"))
        x = _layer_norm(_linear(up, w, f"{p}.output.dense") + x, w, f"{p}.output.LayerNorm", eps)
    return x


def pool(tokens: F64, mask: NDArray[np.int64], mode: str, normalize: bool) -> F64:
    """sentence-transformers' Pooling (one mode) and, if asked, Normalize."""
    m = mask[..., None].astype(np.float64)
    if mode == "mean":
        pooled = (tokens * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    elif mode == "cls":
        pooled = tokens[:, 0]
    elif mode == "max":
        pooled = np.where(m > 0, tokens, -1e9).max(1)
    elif mode == "lasttoken":
        flipped = mask[:, ::-1]
        found = flipped.argmax(1)
        found = np.where(flipped.max(1) == 0, mask.shape[1] - 1, found)
        pooled = tokens[np.arange(len(tokens)), mask.shape[1] - found - 1]
    else:
        raise ValueError(mode)
    if normalize:
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return np.asarray(pooled)
