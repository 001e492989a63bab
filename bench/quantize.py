"""Question: is there an int8 (or other CPU-fast) variant of all-MiniLM-L6-v2 that beats the fused fp32 graph
(fp32_opt) on this CPU while keeping cosine >= 0.99 to the sentence-transformers reference on every golden text,
and giving each text the same vector whatever it is batched with (cosine >= 0.99999 alone vs in a batch)?

Builds the candidates from a fresh conversion, then in the same run measures each one's golden cosines (alone,
batches of 8 and all 57 at once padded to 256 tokens, worst row of any), the worst alone-vs-batched cosine, and its
throughput on length-sorted batches of bench/corpus.py passages, rounds alternating between variants, medians
reported: wall-clock docs/s and docs per CPU-second of the process (steadier on a shared machine; with --threads 1
it is the inference thread's own time). Prints a table and writes OUT/quantize.json with ratios vs fp32 and
fp32_opt.

Findings with per-token scales (ORT 1.32, 2-core AVX512-VNNI CPU, --threads 1, CPU time): the per-tensor int8 of
converter v2 (attention and its output projection, FFN fp32) ran at 1.22x fp32_opt with golden min 0.9946 alone but
0.9927 in batches and 0.9882 alone-vs-batched. Per-token u8 x s8 on all 18 weight MatMuls, fused fp32 Attention kept:
symmetric rows 1.55x and 0.9923, asymmetric rows (shipped) 1.43x and 0.9950, both exactly batch-invariant.
Un-fusing Attention to quantize QKV too (MultiHeadAttention) was slower; MatMulNBits 8-bit (accuracy_level 4,
block 32) reached 0.9989 at 1.11x.

Earlier findings, per-tensor (converter v2): the error is activation quantization, not weights (weight-only
int8 keeps 0.997): dynamic quantization scales each MatMul input per tensor and the feed-forward inputs carry the
[CLS] row's outliers, so any variant quantizing them lands near 0.965 on "?!". SmoothQuant (alpha 0.5-0.85) did not
recover it. Static QDQ on the fused graph quantizes only the MatMul weights (the contrib ops' outputs get no Q/DQ),
which ORT turns into MatMulNBits: 0.997 but fp32 speed (1.03-1.05x with session.qdq_matmulnbits_accuracy_level=4).
Signed int8 weights use the VNNI kernels; unsigned (u8u8) ones ran slower than fp32_opt.

    .venv/bin/python bench/quantize.py [--docs 256] [--batch 32] [--rounds 3] [--threads 2] [--only REGEX]
        [--out bench/out]
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path and bench/tokenize.py would shadow the stdlib
# `tokenize` (imported by numpy via inspect/linecache); keep the folder, but last, for `corpus`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import json
import platform
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import corpus
import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import helper, numpy_helper

from embedpool import _native
from embedpool.model import default_checkpoint
from embedpool.model.convert import VARIANT_FILES, convert_checkpoint
from embedpool.model.int8 import quantize_per_token

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
Feeds = dict[str, NDArray[np.int64]]
QUANTIZED_OPS = ("MatMul", "Attention")


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def pad(rows: Sequence[Sequence[int]], width: int | None = None) -> Feeds:
    ids = np.zeros((len(rows), width or max(len(r) for r in rows)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return {"input_ids": ids, "attention_mask": mask}


def cosines(a: NDArray[np.float32], b: NDArray[np.float32]) -> NDArray[np.float64]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.asarray((a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)))


def golden_cosines(s: ort.InferenceSession) -> tuple[NDArray[np.float64], float]:
    """Per golden text, the worst cosine to the reference of (alone, batches of 8, all 57 padded to 256 tokens);
    and the worst cosine between a text alone and the same text batched."""
    rows = json.loads((DATA / "minilm_golden.json").read_text(encoding="utf-8"))["input_ids"]
    ref = np.load(DATA / "minilm_golden.npy")
    alone = np.concatenate([s.run(None, pad([row]))[0] for row in rows])
    by8 = np.concatenate([s.run(None, pad(rows[i : i + 8]))[0] for i in range(0, len(rows), 8)])
    together = s.run(None, pad(rows, width=256))[0]
    to_ref = np.minimum.reduce([cosines(out, ref) for out in (alone, by8, together)])
    return to_ref, float(min(cosines(by8, alone).min(), cosines(together, alone).min()))


def encode(tokenizer: _native.Tokenizer, texts: Sequence[str], batch: int) -> list[Feeds]:
    ordered = sorted(texts, key=len)
    out = []
    for i in range(0, len(ordered), batch):
        ids, mask, _ = tokenizer.encode(ordered[i : i + batch])
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def throughput(s: ort.InferenceSession, batches: Sequence[Feeds]) -> tuple[float, float]:
    """(docs per wall-clock second, docs per CPU-second of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for feeds in batches:
        s.run(None, feeds)
    docs = sum(f["input_ids"].shape[0] for f in batches)
    return docs / (time.perf_counter() - wall), docs / (time.process_time() - cpu)


def per_token(src: Path, out: Path, *, asymmetric: bool) -> None:
    onnx.save(quantize_per_token(onnx.load(str(src)), asymmetric=asymmetric), str(out))


# --- candidates ---------------------------------------------------------------------------------------------


def dynamic(src: Path, out: Path, *, signed: bool, exclude: Sequence[str] = (), reduce_range: bool = False) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(out),
        weight_type=QuantType.QInt8 if signed else QuantType.QUInt8,
        per_channel=True,
        reduce_range=reduce_range,
        op_types_to_quantize=list(QUANTIZED_OPS),
        nodes_to_exclude=list(exclude),
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def channel_absmax(model: onnx.ModelProto, tensors: Sequence[str], batches: Sequence[Feeds]) -> dict[str, Any]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in tensors:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    result: dict[str, Any] = {}
    for feeds in batches:
        real = feeds["attention_mask"].astype(bool)
        for name, value in zip(tensors, s.run(list(tensors), feeds), strict=True):
            m = np.abs(value)[real].max(axis=0)
            result[name] = np.maximum(result[name], m) if name in result else m
    return result


def smoothquant(src: Path, out: Path, calibration: Sequence[Feeds], alpha: float) -> None:
    """SmoothQuant: x/s before each MatMul, s folded into the weight rows (exact in fp32), then dynamic s8."""
    model = onnx.load(str(src))
    weights = {t.name: t for t in model.graph.initializer}
    targets = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    amax = channel_absmax(model, sorted({n.input[0] for n in targets}), calibration)
    nodes = list(model.graph.node)
    for node in targets:
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        scale = np.maximum(amax[node.input[0]], 1e-5) ** alpha / np.maximum(np.abs(w).max(1), 1e-5) ** (1 - alpha)
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(w * scale[:, None].astype(np.float32), node.input[1]))
        inv = numpy_helper.from_array((1 / scale).astype(np.float32), f"smooth/{node.name}/inv")
        model.graph.initializer.append(inv)
        mul = helper.make_node("Mul", [node.input[0], inv.name], [f"smooth/{node.name}/x"], name=f"smooth/{node.name}")
        node.input[0] = mul.output[0]
        nodes.insert(nodes.index(node), mul)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    smoothed = out.with_suffix(".smoothed.onnx")
    onnx.save(model, str(smoothed))
    dynamic(smoothed, out, signed=True)


class _Reader:
    def __init__(self, batches: Sequence[Feeds]) -> None:
        self._it: Iterator[Feeds] = iter(batches)

    def get_next(self) -> Feeds | None:
        return next(self._it, None)


def static_qdq(src: Path, out: Path, calibration: Sequence[Feeds], method: str, symmetric: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(src),
        str(out),
        _Reader(calibration),  # type: ignore[arg-type]
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=64, help="corpus passages for static/smooth calibration")
    parser.add_argument("--only", default="", help="regex: build only the candidates it matches (baselines always run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="embedpool-quantize-"))
    model_dir = convert_checkpoint(default_checkpoint(), work / "model")
    opt = model_dir / VARIANT_FILES["fp32_opt"]
    tokenizer = _native.Tokenizer(str(model_dir / "tokenizer.json"), max_length=256, pad_to_multiple_of=8)
    passages = corpus.passages(4000)
    rng = random.Random(0)
    sample = rng.sample(passages, args.docs + args.calibration)
    batches = encode(tokenizer, sample[: args.docs], args.batch)
    calibration = encode(tokenizer, sample[args.docs :], 16)
    names = [n.name for n in onnx.load(str(opt)).graph.node]
    ffn = [n for n in names if "/ffn/" in n]
    ffn_down = [n for n in names if "/ffn/down/" in n]

    builders: dict[str, Callable[[Path], None]] = {
        "int8 v2 (dyn s8 per tensor, FFN fp32)": lambda p: dynamic(opt, p, signed=True, exclude=ffn),
        "int8_per_token_symmetric": lambda p: per_token(opt, p, asymmetric=False),
        "int8_dyn_u8_no_ffn (v1)": lambda p: dynamic(opt, p, signed=False, exclude=ffn),
        "int8_dyn_u8_all": lambda p: dynamic(opt, p, signed=False),
        "int8_dyn_s8_all": lambda p: dynamic(opt, p, signed=True),
        "int8_dyn_s8_no_ffn_down": lambda p: dynamic(opt, p, signed=True, exclude=ffn_down),
        "int8_dyn_s8_no_ffn_rr": lambda p: dynamic(opt, p, signed=True, exclude=ffn, reduce_range=True),
        "int8_smoothquant_a0.7": lambda p: smoothquant(opt, p, calibration, 0.7),
        "int8_static_qdq_minmax": lambda p: static_qdq(opt, p, calibration, "MinMax", False),
    }
    paths: dict[str, Path] = {
        "fp32": model_dir / VARIANT_FILES["fp32"],
        "fp32_opt": opt,
        "int8 shipped (per token, asymmetric)": model_dir / VARIANT_FILES["int8"],
    }
    errors: dict[str, str] = {}
    for name, build in builders.items():
        if not re.search(args.only, name):
            continue
        path = work / f"{name}.onnx"
        try:
            build(path)
            paths[name] = path
        except Exception as exc:  # a candidate that cannot be built is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]

    sessions = {name: session(path, args.threads) for name, path in paths.items()}
    measured = {name: golden_cosines(s) for name, s in sessions.items()}
    cos = {name: m[0] for name, m in measured.items()}
    invariance = {name: m[1] for name, m in measured.items()}
    for s in sessions.values():  # warm every shape
        for feeds in batches:
            s.run(None, feeds)
    speeds: dict[str, list[float]] = {name: [] for name in sessions}
    cpu_speeds: dict[str, list[float]] = {name: [] for name in sessions}
    for r in range(args.rounds):
        order = list(sessions) if r % 2 == 0 else list(reversed(sessions))
        for name in order:
            wall, cpu = throughput(sessions[name], batches)
            speeds[name].append(wall)
            cpu_speeds[name].append(cpu)
    tokens = int(sum(f["attention_mask"].sum() for f in batches))
    med = {name: statistics.median(v) for name, v in speeds.items()}
    cpu_med = {name: statistics.median(v) for name, v in cpu_speeds.items()}
    rows = []
    for name in sessions:
        rows.append(
            {
                "variant": name,
                "docs_per_s": med[name],
                "tokens_per_s": med[name] * tokens / args.docs,
                "rounds_docs_per_s": speeds[name],
                "docs_per_cpu_s": cpu_med[name],
                "rounds_docs_per_cpu_s": cpu_speeds[name],
                "vs_fp32": med[name] / med["fp32"],
                "vs_fp32_opt": med[name] / med["fp32_opt"],
                "cpu_vs_fp32_opt": cpu_med[name] / cpu_med["fp32_opt"],
                "min_cosine": float(cos[name].min()),
                "mean_cosine": float(cos[name].mean()),
                "meets_0.99": bool(cos[name].min() >= 0.99),
                "alone_vs_batched_min_cosine": invariance[name],
                "batch_invariant": invariance[name] >= 0.99999,
            }
        )
    print(f"{args.docs} docs, mean {tokens / args.docs:.0f} tokens, batches of {args.batch}, {args.threads} threads")
    print(
        f"{'variant':40} {'docs/s':>7} {'tok/s':>8} {'x fp32':>7} {'x opt':>6} {'/cpu-s':>7} {'x opt':>6} "
        f"{'min cos':>8} {'mean cos':>8} {'alone/batch':>11}"
    )
    for row in rows:
        print(
            f"{row['variant']:40} {row['docs_per_s']:7.1f} {row['tokens_per_s']:8.0f} {row['vs_fp32']:7.2f} "
            f"{row['vs_fp32_opt']:6.2f} {row['docs_per_cpu_s']:7.1f} {row['cpu_vs_fp32_opt']:6.2f} "
            f"{row['min_cosine']:8.4f} {row['mean_cosine']:8.4f} {row['alone_vs_batched_min_cosine']:11.6f}"
        )
    for name, err in errors.items():
        print(f"{name}: not built: {err}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "question": "int8 CPU variant faster than fp32_opt, min golden cosine >= 0.99, batch-invariant?",
        "settings": {
            "docs": args.docs,
            "batch": args.batch,
            "rounds": args.rounds,
            "intra_op_threads": args.threads,
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "mean_tokens": tokens / args.docs,
            "onnxruntime": ort.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
        },
        "variants": rows,
        "not_built": errors,
        "ratios": {row["variant"]: {"vs_fp32": row["vs_fp32"], "vs_fp32_opt": row["vs_fp32_opt"]} for row in rows},
    }
    (args.out / "quantize.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
