"""One ONNX Runtime session over one variant of a model bundle: token ids in, unit vectors out."""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from embedpool.errors import InferenceFailed, InvalidArgument, NotFound, Unavailable
from embedpool.model.convert import Variant
from embedpool.model.loader import ModelBundle

Device = Literal["cpu", "cuda"]
VariantChoice = Variant | Literal["auto"]

_PROVIDERS: dict[Device, str] = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Best variant first. CPU prefers exact fp32 over int8 (0.5% cosine for speed): the engine asks for int8 on VNNI CPUs.
_AUTO_ORDER: dict[Device, tuple[Variant, ...]] = {"cpu": ("fp32_opt", "fp32"), "cuda": ("fp16", "fp32")}
# The fused Attention kernels read the mask as "first n tokens are real" (MaskIndexEnd): right padding only.
_NEEDS_RIGHT_PADDING: frozenset[Variant] = frozenset({"fp32_opt", "fp16", "int8"})


def _resolve_variant(bundle: ModelBundle, variant: VariantChoice, device: Device) -> Variant:
    if variant == "auto":
        return next(v for v in _AUTO_ORDER[device] if v in bundle.onnx)
    if variant not in bundle.onnx:
        raise NotFound(f"model {bundle.config.name} has no {variant!r} variant (has {sorted(bundle.onnx)})")
    return variant


@functools.cache
def load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of the nvidia-* wheels before the first CUDA session.

    onnxruntime-gpu does not link them from its own wheel: without this, the CUDA EP fails to load where the
    libraries come from pip packages rather than the system path, and ORT would run on its CPU fallback
    (which the session then refuses). A no-op before ORT 1.21, which has no preload_dlls."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()


def _session_options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class Terminated(Exception):  # not a failure: the outcome of terminate()
    """The run was stopped by `EmbeddingSession.terminate()`."""


class EmbeddingSession:
    """Embeds batches of token ids. One thread at a time calls `embed` (each worker owns its session)."""

    def __init__(
        self,
        bundle: ModelBundle,
        variant: VariantChoice = "auto",
        device: Device = "cpu",
        intra_op_threads: int = 1,
        cuda_device: int = 0,
    ) -> None:
        if device not in _PROVIDERS:
            raise InvalidArgument(f"device must be one of {sorted(_PROVIDERS)}, got {device!r}")
        if intra_op_threads < 1:
            raise InvalidArgument(f"intra_op_threads must be >= 1, got {intra_op_threads}")
        self._config = bundle.config
        self._variant = _resolve_variant(bundle, variant, device)
        self._device: Device = device
        self._running: ort.RunOptions | None = None
        providers: list[str | tuple[str, dict[str, str]]] = [_PROVIDERS[device]]
        if device == "cuda":
            providers = [(_PROVIDERS[device], {"device_id": str(cuda_device)}), "CPUExecutionProvider"]
        if device == "cuda":
            load_cuda_libraries()
        try:
            self._session = ort.InferenceSession(
                str(bundle.onnx[self._variant]), _session_options(intra_op_threads), providers=providers
            )
        except Exception as exc:  # ORT raises its own pybind exception types
            raise Unavailable(f"cannot start an ONNX Runtime session for {bundle.onnx[self._variant]}: {exc}") from exc
        active = self._session.get_providers()
        if not active or active[0] != _PROVIDERS[device]:
            # ORT falls back to CPU silently when CUDA libraries are missing; a "GPU" worker on CPU is a fault.
            raise Unavailable(f"{_PROVIDERS[device]} requested but ONNX Runtime activated {active}")
        self._input_names = {i.name for i in self._session.get_inputs()}
        self._output_name: str = self._session.get_outputs()[0].name

    @property
    def variant(self) -> Variant:
        return self._variant

    @property
    def provider(self) -> str:
        return str(self._session.get_providers()[0])

    @property
    def dim(self) -> int:
        return self._config.dim

    def _feeds(self, input_ids: NDArray[np.int64], attention_mask: NDArray[np.int64]) -> dict[str, NDArray[np.int64]]:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise InvalidArgument(f"input_ids {ids.shape} and attention_mask {mask.shape} must be equal, non-empty 2-D")
        if ids.shape[1] > self._config.max_positions:
            raise InvalidArgument(f"sequence of {ids.shape[1]} tokens exceeds {self._config.max_positions}")
        if self._variant in _NEEDS_RIGHT_PADDING and bool(np.any(mask[:, 1:] > mask[:, :-1])):
            raise InvalidArgument(f"variant {self._variant} needs right-padded batches (mask = ones then zeros)")
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return feeds

    def embed(self, input_ids: NDArray[np.int64], attention_mask: NDArray[np.int64]) -> NDArray[np.float32]:
        """[batch, seq] int64 ids and mask (1 = token, 0 = padding) -> [batch, dim] float32 unit vectors.
        A run stopped by `terminate()` raises Terminated."""
        feeds = self._feeds(input_ids, attention_mask)
        options = ort.RunOptions()
        self._running = options
        try:
            run = self._run_cuda if self._device == "cuda" else self._run_cpu
            result = run(feeds, options)
        except Exception as exc:
            if options.terminate:
                raise Terminated("the run was stopped: nobody waits for its results") from exc
            where = f"{self._config.name}/{self._variant} on batch {input_ids.shape}"
            raise InferenceFailed(f"inference failed for {where}: {exc}") from exc
        finally:
            self._running = None
        return np.asarray(result, dtype=np.float32)

    def terminate(self) -> None:
        """Stop the run in progress, if any (from another thread): ONNX Runtime checks the flag between
        operators, so a batch whose callers all left stops within one layer instead of running to the end."""
        options = self._running
        if options is not None:
            options.terminate = True

    def _run_cpu(self, feeds: dict[str, NDArray[np.int64]], options: ort.RunOptions) -> NDArray[np.float32]:
        out: NDArray[np.float32] = self._session.run([self._output_name], feeds, options)[0]
        return out

    def _run_cuda(self, feeds: dict[str, NDArray[np.int64]], options: ort.RunOptions) -> NDArray[np.float32]:
        # Inputs are copied to the device once; the output is bound to host memory so only [batch, dim] comes back.
        binding = self._session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(self._output_name, "cpu")
        self._session.run_with_iobinding(binding, options)
        out: NDArray[np.float32] = binding.copy_outputs_to_cpu()[0]
        return out
