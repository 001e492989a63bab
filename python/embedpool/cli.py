"""Command line: `embedpool serve | model prepare | model convert | embed | ingest | search | sync | bench | keys |
audit | usage`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedpool import config, tracing
from embedpool.errors import EmbedpoolError
from embedpool.logs import configure

if TYPE_CHECKING:
    from tqdm import tqdm

    from embedpool.client import Client, IndexOptions, IngestProgress


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = config.load(args)
    configure(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from embedpool.server.workers import supervise

        return supervise(settings)  # each worker configures its own tracing
    from embedpool.server.process import run

    tracing.configure()  # from the standard OTEL_* environment; off without it
    try:
        return run(settings)
    finally:
        tracing.shutdown()  # the last calls' spans are exported before the process ends


def _cmd_model_prepare(args: argparse.Namespace) -> int:
    from embedpool.engine import prepare

    settings = config.load(args)
    bundle = prepare(settings)
    print(json.dumps({"path": str(bundle.root), "name": bundle.config.name, "dim": bundle.config.dim}))
    return 0


def _cmd_model_convert(args: argparse.Namespace) -> int:
    from embedpool.model import convert_checkpoint

    out = convert_checkpoint(Path(args.src), Path(args.out))
    print(out)
    return 0


def _client(args: argparse.Namespace) -> Client:
    """A client of `--target` (replicas separated by commas) with the client flags' credentials (see
    `_add_client_arguments`)."""
    from embedpool.client import Client

    return Client(args.target, api_key=args.api_key, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)


def _cmd_embed(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.collection:
            stored = client.upsert(args.collection, args.texts, return_vectors=True)
            vectors, ids = stored.vectors, stored.ids
        else:
            vectors = client.embed(args.texts, model=args.model, input_type=args.input_type)
            ids = [""] * len(args.texts)
    assert vectors is not None
    for text, vec, ident in zip(args.texts, vectors, ids, strict=True):
        print(json.dumps({"id": ident, "text": text[:60], "dim": len(vec), "head": vec[:4].round(4).tolist()}))
    return 0


def _index_options(args: argparse.Namespace) -> IndexOptions | None:
    """IndexOptions from the ingest flags, or None when none was given (use the collection as it is)."""
    from embedpool.client import IndexOptions

    if not (args.hnsw_m or args.hnsw_ef_construction or args.halfvec):
        return None
    return IndexOptions(m=args.hnsw_m, ef_construction=args.hnsw_ef_construction, halfvec=args.halfvec)


def _cmd_ingest(args: argparse.Namespace) -> int:
    from embedpool.client import CheckpointError, FileSource, SourceError, checkpoint_path

    try:
        source = FileSource(args.source)
        with _client(args) as client, _ProgressBar(enabled=not args.quiet) as bar:
            if not args.no_create:
                # Without index, storage or size flags, an existing collection is taken as it is; with them, it must
                # match.
                index = _index_options(args)
                client.create_collection(
                    args.collection,
                    index=index,
                    storage=args.storage or "float32",
                    dimensions=args.dimensions,
                    exist_ok=index is None and args.storage is None and args.dimensions is None,
                )
            summary = client.ingest(
                args.collection,
                source,
                batch_size=args.batch_size,
                bulk=not args.no_bulk,
                checkpoint=checkpoint_path(args.source, args.state_dir),
                resume=not args.restart,
                progress=bar.update if not args.quiet else None,
            )
    except (SourceError, CheckpointError) as exc:
        print(f"embedpool ingest: {exc}", file=sys.stderr)
        return 2
    except EmbedpoolError as exc:
        print(f"embedpool ingest: {type(exc).__name__}: {exc} (re-run to resume)", file=sys.stderr)
        return 1
    for doc_id, reason in summary.rejected:
        print(json.dumps({"rejected": doc_id, "reason": reason}), file=sys.stderr)
    print(
        json.dumps(
            {
                "documents": summary.documents,
                "resumed_after": summary.resumed_after,
                "inserted": summary.inserted,
                "updated": summary.updated,
                "unchanged": summary.unchanged,
                "skipped_unchanged": summary.skipped_unchanged,
                "rejected": len(summary.rejected),
                "docs_per_s": round(summary.docs_per_s, 1),
            }
        )
    )
    return 1 if summary.rejected else 0


class _ProgressBar:
    """The ingest's progress as a tqdm bar, opened at the first report (which knows the total)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: tqdm[Any] | None = None

    def update(self, progress: IngestProgress) -> None:
        from tqdm import tqdm

        bar = self.bar
        if bar is None:
            bar = self.bar = tqdm(total=progress.total, unit="doc", dynamic_ncols=True, smoothing=0.1)
        bar.update(progress.acknowledged - bar.n)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _cmd_search(args: argparse.Namespace) -> int:
    with _client(args) as client:
        hits = client.search(args.collection, args.query, k=args.k)
    for hit in hits:
        print(json.dumps({"id": hit.id, "score": round(hit.score, 4), "text": hit.text[:80]}))
    return 0


def _cmd_sync(args: argparse.Namespace) -> int:
    import dataclasses

    with _client(args) as client:
        match args.sync_command:
            case "create":
                columns = tuple(c.strip() for c in args.metadata_columns.split(",") if c.strip())
                syncs = [
                    client.create_sync(
                        args.name,
                        source=args.source,
                        id_column=args.id_column,
                        text=args.text,
                        collection=args.collection,
                        metadata_columns=columns,
                        where=args.where,
                        database=args.database,
                    )
                ]
            case "list":
                syncs = client.list_syncs()
            case "status":
                syncs = [client.get_sync(args.name)]
            case "pause":
                syncs = [client.pause_sync(args.name)]
            case "resume":
                syncs = [client.resume_sync(args.name)]
            case "drop":
                client.drop_sync(args.name)
                syncs = []
    for sync in syncs:
        print(json.dumps(dataclasses.asdict(sync)))
    return 0


def _add_sync_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sync = sub.add_parser(
        "sync", help="keep a collection equal to a table of your database (a running server does the work)"
    ).add_subparsers(dest="sync_command", required=True)
    create = sync.add_parser("create", help="install the table's trigger, queue its rows, and start syncing")
    create.add_argument("name", help="the sync's name (a-z, then a-z 0-9 _)")
    create.add_argument("--source", required=True, help="schema.table (or table, in schema public)")
    create.add_argument("--id-column", required=True, help="the table's key; it becomes the document id")
    create.add_argument("--text", required=True, help="SQL expression over the row, e.g. \"title || ' ' || body\"")
    create.add_argument("--collection", required=True, help="created if it does not exist")
    create.add_argument("--metadata-columns", default="", help="columns stored as metadata, separated by commas")
    create.add_argument("--where", default="", help="SQL condition: rows not matching it stay out of the collection")
    create.add_argument("--database", default="", help="a name from the server's --sync-databases (default: its own)")
    _add_client_arguments(create)
    for verb, what in (
        ("list", "every sync with its backlog, lag, rows/s and dead letters"),
        ("status", "one sync with its backlog, lag, rows/s, dead letters and last error"),
        ("pause", "stop working a sync's queue (changes go on queueing)"),
        ("resume", "work a paused sync's queue again"),
        ("drop", "remove the trigger and the queue (the collection stays)"),
    ):
        command = sync.add_parser(verb, help=what)
        if verb != "list":
            command.add_argument("name")
        _add_client_arguments(command)
    sub.choices["sync"].set_defaults(func=_cmd_sync)


def _cmd_bench(args: argparse.Namespace) -> int:
    from embedpool.benchmark.command import run

    return run(args)


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", default="127.0.0.1:50051", help="host:port; replicas separated by commas are taken in turn"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("EMBEDPOOL_API_KEY", ""),
        help="sent as 'authorization: Bearer <key>' (default: $EMBEDPOOL_API_KEY); without --tls-ca only to a"
        " loopback target",
    )
    parser.add_argument("--tls-ca", default="", help="PEM CA bundle: connect with TLS, verifying the server by it")
    parser.add_argument("--tls-cert", default="", help="PEM client certificate, for a server that requires mTLS")
    parser.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")


def build_parser() -> argparse.ArgumentParser:
    from embedpool import __version__

    parser = argparse.ArgumentParser(prog="embedpool", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server (embedded Postgres unless --database-url)")
    config.add_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    model = sub.add_parser("model", help="model preparation").add_subparsers(dest="model_command", required=True)
    prepare = model.add_parser("prepare", help="convert the configured model into the cache (idempotent)")
    config.add_arguments(prepare)
    prepare.set_defaults(func=_cmd_model_prepare)
    convert = model.add_parser("convert", help="convert a safetensors BERT checkpoint dir to an ONNX model dir")
    convert.add_argument("src")
    convert.add_argument("out")
    convert.set_defaults(func=_cmd_model_convert)

    embed = sub.add_parser("embed", help="embed texts with a running server")
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--collection", default="")
    embed.add_argument("--model", default="", help="a served model's name (default: the server's default)")
    embed.add_argument("--input-type", default="", help="query, document or one of the model's prompt names")
    _add_client_arguments(embed)
    embed.set_defaults(func=_cmd_embed)

    ingest = sub.add_parser("ingest", help="stream a JSONL file or a directory of .txt/.md into a collection")
    ingest.add_argument("collection")
    ingest.add_argument("source", help='FILE.jsonl ({"id"?, "text", "metadata"?} per line) or DIR')
    _add_client_arguments(ingest)
    ingest.add_argument("--batch-size", type=int, default=256)
    ingest.add_argument("--restart", action="store_true", help="ignore the checkpoint and start from the top")
    ingest.add_argument("--no-create", action="store_true", help="fail unless the collection exists")
    ingest.add_argument("--hnsw-m", type=int, default=0, help="new collection's HNSW m (0: default 16)")
    ingest.add_argument(
        "--hnsw-ef-construction", type=int, default=0, help="new collection's HNSW ef_construction (0: default 64)"
    )
    ingest.add_argument(
        "--halfvec", action="store_true", help="new collection indexes half-precision vectors (reranked exactly)"
    )
    ingest.add_argument(
        "--storage",
        choices=("float32", "float16", "binary"),
        help="new collection stores its vectors as float32 (default), float16 (half the bytes) or binary (bits"
        " for a Hamming index plus float32 for the exact rerank)",
    )
    ingest.add_argument(
        "--dimensions",
        type=int,
        help="new collection keeps this many of the model's dimensions (a Matryoshka size the model declares,"
        " see GetModelInfo; default: all)",
    )
    ingest.add_argument(
        "--no-bulk",
        action="store_true",
        help="grow the HNSW graph row by row even when the collection is empty (default: load it without the"
        " index and build the index at the end)",
    )
    ingest.add_argument("--state-dir", help="where the checkpoint goes (default: next to the source)")
    ingest.add_argument("--quiet", action="store_true", help="no progress bar")
    ingest.set_defaults(func=_cmd_ingest)

    search = sub.add_parser("search", help="search a collection of a running server")
    search.add_argument("collection")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5)
    _add_client_arguments(search)
    search.set_defaults(func=_cmd_search)

    _add_sync_parsers(sub)

    from embedpool.benchmark import add_arguments as add_bench_arguments

    bench = sub.add_parser(
        "bench", help="throughput and latency of a server (gRPC or HTTP) or of the engine alone, with baselines"
    )
    _add_client_arguments(bench)
    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench, target="")  # no --target: 127.0.0.1:50051, or engine-only with --model

    from embedpool import admin  # keys, audit, usage: on the database directly

    admin.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EmbedpoolError as exc:
        print(f"embedpool: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
