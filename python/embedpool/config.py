"""One settings object. Each field is a CLI flag (`--max-batch-tokens`) and an env var (`EMBEDPOOL_MAX_BATCH_TOKENS`).

Precedence: CLI flag > env var > default. Values are parsed and validated once, here; the rest of the code
trusts a `Settings`. Defaults that depend on the device (batch budget, threads) are resolved by `resolved()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedpool.errors import InvalidArgument

ENV_PREFIX = "EMBEDPOOL_"


def _setting(default: Any, help: str, *, choices: Sequence[str] | None = None, repeatable: bool = False) -> Any:
    """`repeatable`: the flag may be given several times; its values are joined with commas."""
    return field(default=default, metadata={"help": help, "choices": choices, "repeatable": repeatable})


@dataclass(frozen=True)
class Settings:
    host: str = _setting("127.0.0.1", "address the gRPC server binds")
    port: int = _setting(50051, "gRPC port (0 picks a free one)")
    http_port: int = _setting(
        8080, "HTTP port: OpenAI-compatible /v1/embeddings, collections, /docs (0 picks a free one, -1 disables)"
    )
    metrics_port: int = _setting(9464, "Prometheus /metrics port (0 picks a free one, -1 disables)")
    workers: int = _setting(
        1,
        "serving processes on the same ports (SO_REUSEPORT), each with its own pool and sessions; this process"
        " owns the embedded Postgres and serves their merged /metrics",
    )
    reuse_port: bool = _setting(
        False, "share the gRPC and HTTP ports with other processes (SO_REUSEPORT); --workers sets it"
    )
    metrics_host: str = _setting("127.0.0.1", "address /metrics binds (its own, so exposing gRPC does not expose it)")
    insecure: bool = _setting(
        False, "allow non-loopback listeners with neither TLS nor API keys (warned at every start)"
    )
    tls_cert: str = _setting(
        "", "PEM certificate chain: gRPC, HTTP and /metrics serve TLS (reloaded on change or SIGHUP)"
    )
    tls_key: str = _setting("", "PEM private key of --tls-cert")
    tls_client_ca: str = _setting("", "PEM CA bundle: clients must present a certificate it signed (mTLS)")
    auth: str = _setting(
        "off", "off: no credentials (loopback only); keys: every RPC needs an API key", choices=("off", "keys")
    )
    reflection: bool = _setting(True, "serve gRPC reflection (health and reflection need no key)")
    data_dir: Path = _setting(  # noqa: RUF009 - evaluated once at import on purpose: a Path is immutable
        Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "embedpool",
        "where the embedded Postgres and converted models live",
    )
    database_url: str = _setting("", "external Postgres with pgvector; empty starts the embedded one")
    db_pool_size: int = _setting(16, "database connections this server opens at most (each replica its own)")
    db_statement_timeout: float = _setting(30.0, "seconds a database statement may run (0: no limit)")
    db_lock_timeout: float = _setting(10.0, "seconds a statement may wait for a lock (0: no limit)")
    model: str = _setting(
        "",
        "model dir (ONNX or safetensors checkpoint), or NAME=DIR; repeat the flag (or separate by commas) to serve"
        " several, the first being the default for requests that name none; empty = bundled all-MiniLM-L6-v2",
        repeatable=True,
    )
    device: str = _setting(
        "auto",
        "inference device (null: no inference, every vector the same unit vector, to measure the front end;"
        " benchmarks only)",
        choices=("auto", "cpu", "cuda", "null"),
    )
    variant: str = _setting(
        "auto",
        "model variant (auto: fused fp16 on cuda; on cpu int8 with VNNI, else fused fp32)",
        choices=("auto", "fp32", "fp32_opt", "fp16", "int8"),
    )
    matryoshka_dims: tuple[int, ...] = _setting(
        (),
        "sizes the model was trained to be truncated to (Matryoshka); EmbedRequest.dimensions / the HTTP"
        " `dimensions` accept only these",
    )
    cuda_device: int = _setting(
        0, "GPU ordinal this server runs on with --device cuda (pins a replica to one GPU of several)"
    )
    sessions_per_device: int = _setting(1, "ONNX Runtime sessions (one feeder thread each)")
    intra_op_threads: int = _setting(0, "ONNX Runtime threads per session (0: derived from cores)")
    tokenizer_threads: int = _setting(0, "threads tokenizing concurrently (0: derived from cores)")
    max_batch_tokens: int = _setting(0, "padded-token budget of one batch (0: 65536 on cuda, 8192 on cpu)")
    max_batch_size: int = _setting(0, "documents in one batch (0: 256 on cuda, 64 on cpu)")
    max_concurrent_inputs: int = _setting(
        8192, "documents admitted at once; beyond it unary calls get RESOURCE_EXHAUSTED and Ingest streams wait"
    )
    max_concurrent_chars: int = _setting(
        64 * 1024 * 1024, "characters of text admitted at once (bounds memory as the document count does)"
    )
    max_ingest_streams: int = _setting(64, "Ingest streams open at once; beyond it RESOURCE_EXHAUSTED")
    max_request_documents: int = _setting(1024, "documents in one Embed request or Ingest batch")
    max_request_bytes: int = _setting(16 * 1024 * 1024, "largest request message")
    max_windows_per_request: int = _setting(
        256,
        "windows of the model's length one Embed request may split its long inputs into (long_inputs chunk);"
        " a request may ask for fewer (max_windows); each window counts as a document for admission",
    )
    max_metadata_bytes: int = _setting(64 * 1024, "largest metadata of one document (encoded size)")
    max_filter_bytes: int = _setting(16 * 1024, "largest metadata filter of a Search or DeleteDocuments")
    max_delete_ids: int = _setting(10_000, "ids in one DeleteDocuments request")
    max_search_k: int = _setting(1000, "largest k a Search may ask for")
    query_cache_bytes: int = _setting(
        64 * 1024 * 1024,
        "bytes of the exact-match cache of query embeddings, used by Search by text and by Embed calls of a few short"
        " texts without a collection (0 disables it; each worker of --workers has its own)",
    )
    ingest_window: int = _setting(4, "batches of one Ingest stream read ahead and embedding")
    ingest_stores: int = _setting(2, "batches of one Ingest stream stored at once (a database connection each)")
    sync_workers: int = _setting(
        2,
        "sync batches this server works at once, each holding one source database connection while it embeds"
        " (0: this server works no syncs; others sharing the database do)",
    )
    sync_batch_size: int = _setting(256, "queued rows a sync batch claims at once")
    sync_max_attempts: int = _setting(5, "failed attempts after which a sync's row is dead-lettered")
    sync_poll_seconds: float = _setting(
        5.0, "a sync worker with nothing to do looks again after this long even without a notification"
    )
    sync_databases: str = _setting(
        "",
        "databases syncs may read, as NAME=URL pairs separated by spaces (embedpool's own is always 'default')",
    )
    grace_seconds: float = _setting(10.0, "drain time for in-flight requests on shutdown")
    drain_delay: float = _setting(
        0.0,
        "seconds a stopping server goes on serving while it reports not ready (gRPC health NOT_SERVING, /ready"
        " 503), so that balancers' health checks take it out before its listeners close",
    )
    log_level: str = _setting("info", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = _setting(
        "auto", "log format (auto: text on a terminal, else JSON)", choices=("auto", "json", "text")
    )

    def resolved(self, *, cuda: bool, cores: int | None = None) -> Settings:
        """Fills the 0/auto defaults from the device the server actually got."""
        cores = cores or os.cpu_count() or 1
        updates: dict[str, Any] = {}
        if self.max_batch_tokens == 0:
            updates["max_batch_tokens"] = 65536 if cuda else 8192
        if self.max_batch_size == 0:
            updates["max_batch_size"] = 256 if cuda else 64
        if self.intra_op_threads == 0:
            # On CPU, inference and tokenization share the cores; leave none idle but do not oversubscribe.
            updates["intra_op_threads"] = 1 if cuda else max(1, cores // max(1, self.sessions_per_device))
        if self.tokenizer_threads == 0:
            # Each call's texts are split over rayon's pool, but a call of a few documents cannot be split much:
            # on a GPU host only calls tokenized at once fill the cores, so admit one per core. On CPU, inference
            # needs the cores more.
            updates["tokenizer_threads"] = max(1, cores if cuda else min(4, cores))
        return dataclasses.replace(self, **updates)

    def validate(self) -> Settings:
        positive = (
            "workers",
            "sessions_per_device",
            "max_concurrent_inputs",
            "max_concurrent_chars",
            "max_ingest_streams",
            "max_request_documents",
            "max_windows_per_request",
            "max_request_bytes",
            "max_metadata_bytes",
            "max_filter_bytes",
            "max_delete_ids",
            "db_pool_size",
            "ingest_window",
            "ingest_stores",
            "sync_batch_size",
            "sync_max_attempts",
            "sync_poll_seconds",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "max_batch_tokens",
            "max_batch_size",
            "intra_op_threads",
            "tokenizer_threads",
            "cuda_device",
            "port",
            "db_statement_timeout",
            "db_lock_timeout",
            "drain_delay",
            "sync_workers",
            "query_cache_bytes",
        ):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be >= 0, got {getattr(self, name)}")
        # Each below the model's dimension too, which only the loaded model knows (checked by the engine).
        if any(d < 1 for d in self.matryoshka_dims):
            raise InvalidArgument(f"matryoshka_dims must each be >= 1, got {self.matryoshka_dims}")
        if not 1 <= self.max_search_k <= 100_000:
            raise InvalidArgument(f"max_search_k must be in 1..100000, got {self.max_search_k}")
        # A request the admission budget cannot hold would be refused (or, streaming, wait) forever.
        if self.max_request_documents > self.max_concurrent_inputs:
            raise InvalidArgument(
                f"max_request_documents ({self.max_request_documents}) must not exceed max_concurrent_inputs"
                f" ({self.max_concurrent_inputs}): a full request could never be admitted"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgument("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise InvalidArgument("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if self.max_request_bytes > self.max_concurrent_chars:
            raise InvalidArgument(
                f"max_request_bytes ({self.max_request_bytes}) must not exceed max_concurrent_chars"
                f" ({self.max_concurrent_chars}): a full request could never be admitted"
            )
        return self


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind: type[Any] = type(f.default)
    try:
        if kind is bool:
            return raw.lower() in ("1", "true", "yes", "on")
        if kind is tuple:  # comma-separated ints, kept largest first and once each
            return tuple(sorted({int(item) for item in raw.split(",") if item.strip()}, reverse=True))
        return kind(raw)
    except ValueError as exc:
        what = "comma-separated ints" if kind is tuple else kind.__name__
        raise InvalidArgument(f"{ENV_PREFIX}{f.name.upper()}: cannot parse {raw!r} as {what}") from exc


def _shown_default(default: Any) -> str:
    if default in ("", ()):
        return "(empty)"
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per setting; the defaults shown are the built-in ones (env vars override them)."""
    for f in dataclasses.fields(Settings):
        env = ENV_PREFIX + f.name.upper()
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata['help']} [env {env}, default {_shown_default(f.default)}]"
        if f.metadata["repeatable"]:
            parser.add_argument(flag, dest=f.name, default=None, action="append", help=help)
            continue
        if isinstance(f.default, bool):  # `--insecure` alone means true; `--insecure false` is accepted too
            parser.add_argument(flag, dest=f.name, default=None, nargs="?", const="true", help=help)
            continue
        parser.add_argument(flag, dest=f.name, default=None, choices=f.metadata["choices"], help=help)


def load(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = getattr(args, f.name, None) if args is not None else None
        if isinstance(raw, list):  # a repeatable flag
            raw = ",".join(raw)
        if raw is None:
            raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            values[f.name] = _parse(f, str(raw))
    return Settings(**values).validate()


def settings_table() -> str:
    """Markdown table of every setting, for the README (kept honest by a test)."""
    rows = ["| CLI flag | env var | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = "~/.local/share/embedpool" if f.name == "data_dir" else _shown_default(f.default)
        flag = "--" + f.name.replace("_", "-")
        rows.append(f"| `{flag}` | `{ENV_PREFIX}{f.name.upper()}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)
