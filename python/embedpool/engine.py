"""Assembles what inference needs for the configured model and device: tokenizer, warmed sessions, serving metadata.

Each decision it takes is made elsewhere, one module per job: the device in `model.device`, the variant `auto`
serves in `model.variant_policy`, device-derived defaults in `Settings.resolved`, warming in `model.warmup`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from embedpool import _native
from embedpool.config import Settings
from embedpool.errors import StartupError
from embedpool.model import EmbeddingSession, ModelBundle, default_checkpoint, load_model_dir
from embedpool.model.device import cpu_has_vnni, pick_device
from embedpool.model.null import NullSession
from embedpool.model.variant_policy import serving_variant
from embedpool.model.warmup import warm_up
from embedpool.pool import InferenceSession, PoolConfig
from embedpool.pool.scheduler import BatchLimits
from embedpool.pool.windows import Splitter

# The device and variant choices stay importable from here, where callers have always found them.
__all__ = [
    "PAD_MULTIPLE",
    "Engine",
    "ModelSpec",
    "ServingModel",
    "cpu_has_vnni",
    "load_engine",
    "load_engines",
    "model_source",
    "model_specs",
    "pick_device",
    "prepare",
    "prepare_all",
    "serving_variant",
]

log = logging.getLogger(__name__)

# Padding lengths to a multiple of 16 bounds the number of distinct shapes the engine sees (and warms).
PAD_MULTIPLE = 16
LONG_INPUT_WINDOWS = 4096
"""A text to embed in windows may hold this many of the model's lengths of tokens: longer is INVALID_ARGUMENT from
the tokenizer (a request's max_windows refuses it first, unless set this high)."""


@dataclass(frozen=True)
class ServingModel:
    """What clients are told about the model (GetModelInfo) and what collections are tagged with."""

    name: str
    dim: int
    max_tokens: int
    variant: str
    device: str
    pooling: str
    dimensions: tuple[int, ...] = ()  # Matryoshka sizes the model may be truncated to, besides `dim`
    prompts: Mapping[str, str] = field(default_factory=dict)
    """By name (query, passage, ...): the text put before an input of that type (config_sentence_transformers)."""
    default_prompt_name: str = ""
    """The prompt an input of no declared type gets ("": none)."""


@dataclass(frozen=True)
class Engine:
    settings: Settings  # with device-derived defaults filled in
    bundle: ModelBundle
    tokenizer: _native.Tokenizer
    sessions: Sequence[InferenceSession]
    model: ServingModel
    pad_multiple: int

    def pool_config(self) -> PoolConfig:
        """The pool this engine serves through: batch budget, admission budget, tokenizer threads."""
        settings = self.settings
        return PoolConfig(
            dim=self.model.dim,
            limits=BatchLimits(
                max_tokens=settings.max_batch_tokens,
                max_size=settings.max_batch_size,
                pad_multiple=self.pad_multiple,
                pad_id=self.tokenizer.pad_id,
            ),
            max_concurrent_inputs=settings.max_concurrent_inputs,
            max_concurrent_chars=settings.max_concurrent_chars,
            tokenizer_threads=settings.tokenizer_threads,
            model=self.model.name,
        )

    def splitter(self) -> Splitter:
        """For long inputs embedded in windows: a second tokenizer, of the same file, that does not truncate."""
        whole = _native.Tokenizer(
            str(self.bundle.tokenizer_path),
            max_length=self.model.max_tokens * LONG_INPUT_WINDOWS,
            pad_to_multiple_of=self.pad_multiple,
        )
        return Splitter.of(
            lambda texts: whole.encode_ragged(texts, truncate=False),
            self.model.max_tokens,
            _char_offsets(self.bundle.tokenizer_path),
        )


def _char_offsets(path: Path) -> Callable[[str], NDArray[np.int64]]:
    """Character spans of a text's content tokens, for windows stored as passages (a write option, so the Python
    tokenizer, which reports character offsets, not the hot path's)."""
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def offsets(text: str) -> NDArray[np.int64]:
        encoding = tokenizer.encode(text)
        spans = [
            span for span, special in zip(encoding.offsets, encoding.special_tokens_mask, strict=True) if not special
        ]
        return np.asarray(spans, dtype=np.int64).reshape(-1, 2)

    return offsets


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One entry of --model: NAME=DIR, or DIR (named by the model itself), or the bundled model."""

    name: str
    """"": the model's own name (its config's)."""
    source: str
    """A model dir (ONNX or safetensors checkpoint); "": the bundled all-MiniLM-L6-v2."""


def model_specs(settings: Settings) -> list[ModelSpec]:
    """--model's entries, in order (the first is the default for requests that name none)."""
    specs = []
    for entry in settings.model.split(",") if settings.model.strip() else [""]:
        name, sep, source = entry.strip().partition("=")
        specs.append(ModelSpec(name.strip(), source.strip()) if sep else ModelSpec("", name.strip()))
    return specs


def _for_model(settings: Settings, spec: ModelSpec, index: int, count: int) -> Settings:
    """The settings one of `count` models loads and serves with: its own dir; the Matryoshka sizes only for
    the first; an even share of the admission budget (never below a full request), and on CPU of the cores."""
    share = max(settings.max_concurrent_inputs // count, settings.max_request_documents)
    threads = settings.intra_op_threads
    if count > 1 and threads == 0 and settings.device in ("cpu", "auto"):
        threads = max(1, (os.cpu_count() or 1) // (settings.sessions_per_device * count))
    return dataclasses.replace(
        settings,
        model=spec.source,
        matryoshka_dims=settings.matryoshka_dims if index == 0 else (),
        max_concurrent_inputs=share,
        max_concurrent_chars=max(settings.max_concurrent_chars // count, settings.max_request_bytes),
        intra_op_threads=threads,
    )


def prepare_all(settings: Settings) -> list[ModelBundle]:
    """Every --model converted into the cache if needed (idempotent)."""
    return [prepare(dataclasses.replace(settings, model=spec.source)) for spec in model_specs(settings)]


def load_engines(settings: Settings) -> list[Engine]:
    """One engine per --model entry, each with its own sessions (the pool gives each its own scheduler)."""
    specs = model_specs(settings)
    engines = []
    for index, spec in enumerate(specs):
        engine = load_engine(_for_model(settings, spec, index, len(specs)))
        if spec.name:
            engine = dataclasses.replace(engine, model=dataclasses.replace(engine.model, name=spec.name))
        engines.append(engine)
    names = [engine.model.name for engine in engines]
    if len(set(names)) != len(names):
        raise StartupError(f"--model: two models are named alike ({', '.join(names)}); name them NAME=DIR")
    return engines


def model_source(settings: Settings) -> Path:
    return Path(settings.model).expanduser() if settings.model else default_checkpoint()


def prepare(settings: Settings) -> ModelBundle:
    """Converts a safetensors checkpoint into the model cache if needed (idempotent), else loads the ONNX dir."""
    return load_model_dir(model_source(settings), cache_root=settings.data_dir / "models")


def matryoshka_dims(settings: Settings, dim: int) -> tuple[int, ...]:
    """The configured truncation sizes, each checked against the model's dimension before any session starts."""
    too_big = [d for d in settings.matryoshka_dims if d >= dim]
    if too_big:
        raise StartupError(
            f"matryoshka_dims: {', '.join(map(str, too_big))} not below the model's dimension {dim}"
            " (list only the smaller sizes the model was trained to be truncated to)"
        )
    return settings.matryoshka_dims


def load_engine(settings: Settings) -> Engine:
    if settings.device == "null":
        return _null_engine(settings)
    device = pick_device(settings.device)
    cuda = device == "cuda"
    settings = settings.resolved(cuda=cuda, cores=os.cpu_count())
    bundle = prepare(settings)
    dimensions = matryoshka_dims(settings, bundle.config.dim)
    variant = serving_variant(settings.variant, device, bundle)
    if variant == "int8" and device == "cpu" and not cpu_has_vnni():
        log.warning(
            "int8 on a CPU without VNNI: its u8 x s8 products saturate, so vectors stray further from the model's"
            " (cosine down to ~0.92 on the golden texts, against >= 0.995 with VNNI); fp32_opt is exact here"
        )
    sessions = [
        EmbeddingSession(
            bundle,
            variant=variant,
            device=device,
            intra_op_threads=settings.intra_op_threads,
            cuda_device=settings.cuda_device,
        )
        for _ in range(settings.sessions_per_device)
    ]
    for session in sessions:
        warm_up(
            session,
            max_tokens=bundle.config.max_tokens,
            pad_multiple=PAD_MULTIPLE,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            cuda=cuda,
        )
    return _assemble(settings, bundle, sessions, sessions[0].variant, device, dimensions)


def _null_engine(settings: Settings) -> Engine:
    """The real tokenizer and model metadata over sessions that do no inference (`--device null`): the whole
    serving path with the engine's time taken out. It stands in for a GPU, so the defaults are a GPU's."""
    settings = settings.resolved(cuda=True, cores=os.cpu_count())
    bundle = prepare(settings)
    dimensions = matryoshka_dims(settings, bundle.config.dim)
    sessions = [NullSession(bundle.config.dim, settings.max_batch_size) for _ in range(settings.sessions_per_device)]
    log.warning(
        "--device null: NO INFERENCE. Every vector this server returns is the same meaningless unit vector;"
        " it exists to measure the front end (benchmarks only), never to serve or store embeddings"
    )
    return _assemble(settings, bundle, sessions, NullSession.variant, "null", dimensions)


def _assemble(
    settings: Settings,
    bundle: ModelBundle,
    sessions: Sequence[InferenceSession],
    variant: str,
    device: str,
    dimensions: tuple[int, ...],
) -> Engine:
    if not bundle.config.include_prompt and any(bundle.config.prompts.values()):
        # Its pooling leaves the prompt's tokens out, which the graph's pooling cannot: refuse, never serve wrong.
        raise StartupError(
            f"{bundle.config.name}: prompts that pooling excludes (include_prompt false) are not supported"
        )
    tokenizer = _native.Tokenizer(
        str(bundle.tokenizer_path), max_length=bundle.config.max_tokens, pad_to_multiple_of=PAD_MULTIPLE
    )
    model = ServingModel(
        name=bundle.config.name,
        dim=bundle.config.dim,
        max_tokens=bundle.config.max_tokens,
        variant=variant,
        device=device,
        pooling=bundle.config.pooling,
        dimensions=dimensions,
        prompts=dict(bundle.config.prompts or {}),
        default_prompt_name=bundle.config.default_prompt_name or "",
    )
    return Engine(settings, bundle, tokenizer, sessions, model, PAD_MULTIPLE)
