"""`embedpool bench`'s flags, and the validated options a run reads (one place for both)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar, cast

from embedpool.errors import InvalidArgument

if TYPE_CHECKING:  # httpx is loaded when a run starts, not when the CLI builds its parser
    from embedpool.benchmark.credentials import Credentials

__all__ = ["DEFAULT_TARGET", "Options", "add_arguments"]

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_CONCURRENCY = "1,4,16,64"
DEFAULT_PER_REQUEST = "32"
# --front-end: a server started with `--device null` (no inference) at the call sizes callers send, from single
# queries to bulk, under enough callers to keep a GPU host's front end busy: the most the front end can feed.
FRONT_END_CONCURRENCY = "16"
FRONT_END_PER_REQUEST = "1,8,32,128"
# Documents per step when --docs is not given: a step lasts seconds, not milliseconds, on either device.
DEFAULT_DOCS = {"cpu": 1024, "cuda": 32768, "null": 16384}

N = TypeVar("N", int, float)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags beyond the client ones (--target, --api-key, --tls-*), which the CLI adds as for other commands."""
    where = parser.add_argument_group("what to measure (default: gRPC on --target, else 127.0.0.1:50051)")
    where.add_argument("--http", default="", metavar="URL", help="the server's HTTP API instead (/v1/embeddings)")
    where.add_argument(
        "--http-encoding",
        choices=("base64", "float"),
        default="base64",
        help="vectors over HTTP (the OpenAI SDK's default: base64)",
    )
    where.add_argument(
        "--engine",
        action="store_true",
        help="engine-only: raw ONNX Runtime on --model, no server (implied by --model without --target/--http)",
    )
    where.add_argument(
        "--model",
        default="",
        metavar="DIR",
        help="model dir: engine-only mode's model, and the tokenizer and engine baseline of a server run"
        " (default: the model `embedpool serve` loads here)",
    )
    where.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="engine runs: device")
    where.add_argument(
        "--variant",
        choices=("auto", "fp32", "fp32_opt", "fp16", "int8"),
        default="auto",
        help="engine-only mode's graph (auto: what the server would pick; a baseline uses the server's)",
    )
    where.add_argument("--threads", type=int, default=0, help="engine runs: ONNX Runtime threads (0: every core)")

    load = parser.add_argument_group("workload (default: the built-in corpus of real text)")
    texts = load.add_mutually_exclusive_group()
    texts.add_argument("--jsonl", type=Path, metavar="FILE", help='texts from a JSONL file ({"text": ...} per line)')
    texts.add_argument(
        "--tokens", default="", metavar="N,N", help="synthetic texts of exactly these token counts, e.g. 16,128,256"
    )
    load.add_argument("--docs", type=int, default=0, help="documents per step (0: 1024 on CPU, 32768 on GPU)")
    load.add_argument(
        "--per-request",
        default=None,
        metavar="N,N",
        help=f"documents per request, one sweep per value (default {DEFAULT_PER_REQUEST})",
    )

    modes = parser.add_argument_group("modes")
    modes.add_argument(
        "--front-end",
        action="store_true",
        help=f"the front-end ceiling of a server started with --device null: --per-request {FRONT_END_PER_REQUEST}"
        f" at --concurrency {FRONT_END_CONCURRENCY}, no baselines (each unless given)",
    )
    modes.add_argument(
        "--concurrency",
        default=None,
        metavar="N,N",
        help=f"closed loop: concurrent callers per step (default {DEFAULT_CONCURRENCY}; 'none' for no closed loop)",
    )
    modes.add_argument(
        "--rate", default="", metavar="R,R", help="open loop: requests/s per step, after the closed loop"
    )
    modes.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson", help="open loop arrivals")
    modes.add_argument("--duration", type=float, default=0.0, help="seconds a step may last at most (0: no limit)")
    modes.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per workload (reported apart)")
    modes.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    modes.add_argument("--retries", type=int, default=0, help="gRPC retries of a refused request (0: count it)")

    out = parser.add_argument_group("measurements and output")
    out.add_argument(
        "--metrics",
        default="",
        metavar="URL,URL",
        help="the server's Prometheus /metrics, one per replica (default: port 9464 of a single target; 'none')",
    )
    out.add_argument(
        "--baseline",
        default="auto",
        metavar="WHICH",
        help="auto, none, or engine,st: raw ONNX Runtime on the same model file (auto: when the server is on this"
        " machine) and sentence-transformers (auto: when importable)",
    )
    out.add_argument(
        "--batch-sizes", default="", metavar="N,N", help="baselines' batch sizes (default 8..256, GPU ..1024)"
    )
    out.add_argument(
        "--baseline-site", type=Path, metavar="DIR", help="a directory with sentence-transformers and torch to import"
    )
    out.add_argument("--out", type=Path, metavar="DIR", help="write DIR/bench.json and DIR/bench.png")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    out.add_argument(
        "--compare", nargs=2, type=Path, metavar=("A.json", "B.json"), help="print B's figures as ratios to A's"
    )


def _numbers(flag: str, raw: str, kind: type[N]) -> list[N]:
    """Comma-separated positive numbers; "none" or nothing for none."""
    if raw.strip().lower() in ("", "none"):
        return []
    try:
        values = [kind(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgument(f"{flag}: expected comma-separated {kind.__name__}s, got {raw!r}") from None
    if any(v <= 0 for v in values):
        raise InvalidArgument(f"{flag}: every value must be positive, got {raw!r}")
    return values


@dataclass(frozen=True)
class Options:
    mode: str
    """"grpc", "http" or "engine"."""
    target: str
    """gRPC: host:port[,host:port...]; HTTP: the base URL; engine: ""."""
    credentials: Credentials
    http_encoding: Literal["base64", "float"]
    model: str
    device: str
    variant: str
    threads: int
    jsonl: Path | None
    tokens: list[int]
    docs: int
    per_request: list[int]
    """One sweep of the concurrency levels (and rates) per value."""
    concurrency: list[int]
    rates: list[float]
    arrivals: Literal["poisson", "uniform"]
    duration: float
    warmup: float
    timeout: float
    retries: int
    metrics: list[str] | None
    """None: derive from the target; []: none."""
    baselines: set[str] | None
    """None: auto."""
    batch_sizes: list[int]
    baseline_site: Path | None
    out: Path | None
    progress: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        from embedpool.benchmark.credentials import Credentials

        if args.http and args.target:
            raise InvalidArgument("--http and --target: give one server address")
        if args.engine and (args.http or args.target):
            raise InvalidArgument("--engine runs no server: drop --target/--http")
        engine = args.engine or bool(args.model and not args.http and not args.target)
        mode = "engine" if engine else ("http" if args.http else "grpc")
        for flag, value in (("--docs", args.docs), ("--threads", args.threads), ("--retries", args.retries)):
            if value < 0:
                raise InvalidArgument(f"{flag}: must not be negative, got {value}")
        for flag, seconds in (("--duration", args.duration), ("--warmup", args.warmup)):
            if seconds < 0:
                raise InvalidArgument(f"{flag}: must not be negative, got {seconds}")
        if args.timeout <= 0:
            raise InvalidArgument(f"--timeout: must be positive, got {args.timeout}")
        front_end = args.front_end
        per_request = _numbers(
            "--per-request", args.per_request or (FRONT_END_PER_REQUEST if front_end else DEFAULT_PER_REQUEST), int
        )
        if not per_request:
            raise InvalidArgument("--per-request: give at least one size")
        if args.concurrency is None:
            args.concurrency = FRONT_END_CONCURRENCY if front_end else DEFAULT_CONCURRENCY
        concurrency = _numbers("--concurrency", args.concurrency, int)
        rates = _numbers("--rate", args.rate, float)
        if mode != "engine" and not concurrency and not rates:
            raise InvalidArgument("--concurrency none and no --rate: nothing to measure")
        return cls(
            mode=mode,
            target={"engine": "", "http": args.http, "grpc": args.target or DEFAULT_TARGET}[mode],
            credentials=Credentials(args.api_key, args.tls_ca, args.tls_cert, args.tls_key),
            http_encoding=cast(Literal["base64", "float"], args.http_encoding),
            model=args.model,
            device=args.device,
            variant=args.variant,
            threads=args.threads,
            jsonl=args.jsonl,
            tokens=_numbers("--tokens", args.tokens, int),
            docs=args.docs,
            per_request=per_request,
            concurrency=concurrency,
            rates=rates,
            arrivals=cast(Literal["poisson", "uniform"], args.arrivals),
            duration=args.duration,
            warmup=args.warmup,
            timeout=args.timeout,
            retries=args.retries,
            metrics=_metrics(args.metrics),
            baselines=set() if front_end and args.baseline == "auto" else _baselines(args.baseline),
            batch_sizes=_numbers("--batch-sizes", args.batch_sizes, int),
            baseline_site=args.baseline_site,
            out=args.out,
            progress=not args.no_progress,
        )

    def settings(self) -> dict[str, object]:
        """What the JSON records of how the run was set up."""
        return {
            "docs_per_step": self.docs,
            "docs_per_request": self.per_request[0] if len(self.per_request) == 1 else self.per_request,
            "concurrency": self.concurrency,
            "rates": self.rates,
            "arrivals": self.arrivals,
            "duration_s": self.duration,
            "warmup_s": self.warmup,
            "timeout_s": self.timeout,
            "retries": self.retries,
            "http_encoding": self.http_encoding if self.mode == "http" else None,
        }


def _metrics(raw: str) -> list[str] | None:
    if not raw.strip():
        return None
    if raw.strip().lower() == "none":
        return []
    return [u.strip() for u in raw.split(",") if u.strip()]


def _baselines(raw: str) -> set[str] | None:
    names = {x.strip().lower() for x in raw.split(",") if x.strip()}
    if names in ({"auto"}, set()):
        return None
    if names == {"none"}:
        return set()
    unknown = names - {"engine", "st"}
    if unknown:
        raise InvalidArgument(f"--baseline: expected auto, none, or engine and/or st; got {', '.join(sorted(unknown))}")
    return names
