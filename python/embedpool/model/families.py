"""The encoder architectures embedpool builds from safetensors, and what sets each apart from BERT.

Anything else is refused by name at conversion: a graph built on a guess would serve wrong vectors quietly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from embedpool.errors import InvalidArgument


@dataclass(frozen=True)
class Family:
    model_type: str
    # The base-model prefix HF's task heads save weights under (BertModel itself saves none).
    prefix: str
    # RoBERTa-style positions: counted over the attention mask from padding_idx + 1, so the table has
    # padding_idx + 1 rows no token ever reaches.
    offset_positions: bool
    token_types: bool
    # MPNet: a bucketed relative position bias, one table for all layers, added to every attention score.
    relative_bias: bool
    # Whether ONNX Runtime's transformer optimizer fuses its attention, which the fused variants need.
    fuses: bool
    # MPNetEmbeddings fixes padding_idx at 1 whatever config.json's pad_token_id says; RoBERTa's reads it there.
    padding_idx: int | None = None


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("bert", "bert.", offset_positions=False, token_types=True, relative_bias=False, fuses=True),
        Family("roberta", "roberta.", offset_positions=True, token_types=True, relative_bias=False, fuses=True),
        Family("xlm-roberta", "roberta.", offset_positions=True, token_types=True, relative_bias=False, fuses=True),
        Family(
            "mpnet", "mpnet.", offset_positions=True, token_types=False, relative_bias=True, fuses=False, padding_idx=1
        ),
    )
}

# MPNet names its attention projections q/k/v/o and its post-attention LayerNorm one level up; renamed to BERT's.
_MPNET_RENAMES = (
    (re.compile(r"\.attention\.attn\.q\."), ".attention.self.query."),
    (re.compile(r"\.attention\.attn\.k\."), ".attention.self.key."),
    (re.compile(r"\.attention\.attn\.v\."), ".attention.self.value."),
    (re.compile(r"\.attention\.attn\.o\."), ".attention.output.dense."),
    (re.compile(r"\.attention\.LayerNorm\."), ".attention.output.LayerNorm."),
)


def family_of(model_type: str) -> Family:
    """The family of a config.json `model_type`, or InvalidArgument naming it and what is supported."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise InvalidArgument(
            f"unsupported architecture: model_type {model_type!r} cannot be converted from safetensors"
            f" (supported: {', '.join(FAMILIES)}); export it to ONNX with its token-embedding output instead"
        ) from None


def canonical_key(key: str, family: Family) -> str:
    """A weight's name in BertModel's own naming: no task-head prefix, LayerNorm weight/bias, BERT's layer names."""
    if key.startswith(family.prefix):
        key = key[len(family.prefix) :]
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if family.model_type == "mpnet":
        for pattern, bert_name in _MPNET_RENAMES:
            key = pattern.sub(bert_name, key)
    return key
