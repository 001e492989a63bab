"""Admin commands that work on the database directly: `embedpool keys create|list|revoke`, `embedpool audit
verify`, `embedpool usage`. They reach the same database as the server (`--database-url`, or the embedded one
under `--data-dir`: beside a running server, else started for the command), so the first admin key can be
made before any key exists, and an audit can be verified without the server."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread

from embedpool import config
from embedpool.errors import StartupError, Unavailable, one_line
from embedpool.security import audit, keyring
from embedpool.store import Store
from embedpool.store import usage as usage_rows
from embedpool.store.embedded import EmbeddedPostgres, running_uri
from embedpool.store.keys import KeyRecord

__all__ = ["add_parsers"]


@asynccontextmanager
async def _store(settings: config.Settings) -> AsyncIterator[Store]:
    url = settings.database_url or running_uri(settings.data_dir / "pg")
    embedded = None
    if not url:
        embedded = EmbeddedPostgres(settings.data_dir / "pg")
        url = await anyio.to_thread.run_sync(embedded.start)
    try:
        try:
            store = await Store.open(url, max_size=1)
        except Unavailable as e:
            raise StartupError(f"cannot reach the database: {one_line(e.__cause__ or e)}") from e
        try:
            yield store
        finally:
            await store.close()
    finally:
        if embedded is not None:
            await anyio.to_thread.run_sync(embedded.close)


def _key_json(record: KeyRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "tenant": record.tenant,
        "role": record.role,
        "collections": record.collections,
        "tokens_per_s": record.tokens_per_s,
        "docs_per_s": record.docs_per_s,
        "note": record.note,
        "created_at": record.created_at.isoformat(),
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
    }


async def _keys_create(store: Store, args: argparse.Namespace) -> int:
    key, record = await keyring.create_key(
        store,
        tenant=args.tenant,
        role=args.role,
        collections=args.collections,
        tokens_per_s=args.tokens_per_s,
        docs_per_s=args.docs_per_s,
        note=args.note,
    )
    print(json.dumps({"key": key, **_key_json(record)}))
    print("embedpool: the key is shown only this once; store it now", file=sys.stderr)
    return 0


async def _keys_list(store: Store, args: argparse.Namespace) -> int:
    for record in await keyring.list_keys(store, args.tenant):
        print(json.dumps(_key_json(record)))
    return 0


async def _keys_revoke(store: Store, args: argparse.Namespace) -> int:
    print(json.dumps(_key_json(await keyring.revoke_key(store, args.id))))
    return 0


def _head(text: str) -> tuple[int, bytes]:
    seq, _, digest = text.partition(":")
    try:
        return int(seq), bytes.fromhex(digest)
    except ValueError:
        raise argparse.ArgumentTypeError("expected SEQ:HASH as `audit verify` printed it") from None


async def _audit_verify(store: Store, args: argparse.Namespace) -> int:
    result = await audit.verify(store, expect=args.expect)
    report: dict[str, Any] = {
        "ok": result.ok,
        "rows": result.rows,
        "head": f"{result.head_seq}:{result.head_hash.hex()}",
    }
    if not result.ok:
        report.update(broken_at=result.broken_at, reason=result.reason)
    print(json.dumps(report))
    return 0 if result.ok else 1


async def _usage(store: Store, args: argparse.Namespace) -> int:
    async with store.connection() as conn:
        for row in await usage_rows.rows(conn, args.tenant):
            print(json.dumps({**dataclasses.asdict(row), "hour": row.hour.isoformat()}))
    return 0


def _runner(work: Callable[[Store, argparse.Namespace], Awaitable[int]]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        settings = config.load(args)

        async def main() -> int:
            async with _store(settings) as store:
                return await work(store, args)

        return anyio.run(main, backend="asyncio")

    return run


def _database_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for name in ("database_url", "data_dir"):
        f = config.Settings.__dataclass_fields__[name]
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=f.metadata["help"])
    return parser


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="API keys (stored hashed in the database)").add_subparsers(
        dest="keys_command", required=True
    )
    create = _database_flags(keys.add_parser("create", help="make a key; prints it once"))
    create.add_argument("--tenant", required=True, help="the tenant whose collections the key reaches")
    create.add_argument("--role", required=True, choices=("reader", "writer", "admin"))
    create.add_argument("--collections", default="*", help="glob of the tenant's collections it reaches")
    create.add_argument("--tokens-per-s", type=float, default=None, help="rate limit (per server)")
    create.add_argument("--docs-per-s", type=float, default=None, help="rate limit (per server)")
    create.add_argument("--note", default="", help="free text shown by `keys list`")
    create.set_defaults(func=_runner(_keys_create))
    listing = _database_flags(keys.add_parser("list", help="every key (never the secret)"))
    listing.add_argument("--tenant", default=None)
    listing.set_defaults(func=_runner(_keys_list))
    revoke = _database_flags(keys.add_parser("revoke", help="revoke a key on every server sharing the database"))
    revoke.add_argument("id", help="the key's id (`keys list`)")
    revoke.set_defaults(func=_runner(_keys_revoke))

    audit_cmd = sub.add_parser("audit", help="the audit log").add_subparsers(dest="audit_command", required=True)
    verify = _database_flags(audit_cmd.add_parser("verify", help="recompute the hash chain; exit 1 if broken"))
    verify.add_argument("--expect", type=_head, default=None, help="SEQ:HASH printed by an earlier verify")
    verify.set_defaults(func=_runner(_audit_verify))

    usage = _database_flags(sub.add_parser("usage", help="usage per tenant and hour (what billing reads)"))
    usage.add_argument("--tenant", default=None)
    usage.set_defaults(func=_runner(_usage))
