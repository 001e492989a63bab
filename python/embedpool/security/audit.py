"""The audit trail: one event per write or admin action and per refused credential, to the hash-chained
audit_log table and to the JSON log; and `verify`, which recomputes the chain without trusting the database.

The chain proves that no row was edited, removed or inserted after the fact by anyone who did not also
recompute every later hash; a superuser could, so keep the head `verify` prints somewhere else (a ticket,
another system's log) and pass it back as `expect` to prove the history up to it is unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from embedpool.store import Store
from embedpool.store import audit as audit_rows
from embedpool.store.audit import AuditRow

__all__ = ["AuditEvent", "Auditor", "Verification", "row_hash", "verify"]

_log = logging.getLogger("embedpool.audit")
_GENESIS = bytes(32)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class AuditEvent:
    request_id: str
    tenant: str
    key_id: str
    peer: str
    method: str
    collection: str = ""
    documents: int = 0
    status: str = "OK"


class Auditor:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def record(self, event: AuditEvent) -> None:
        """Appends `event` to the table and the log. A database that cannot take it fails the caller's request
        (a write nobody can audit is not acknowledged); the log line is written either way."""
        _log.info(
            "audit %s %s %s",
            event.method,
            event.status,
            event.collection,
            extra={"audit": dataclasses.asdict(event)},
        )
        async with self._store.connection() as conn:
            await audit_rows.append(
                conn,
                request_id=event.request_id,
                tenant=event.tenant,
                key_id=event.key_id,
                peer=event.peer,
                method=event.method,
                collection=event.collection,
                documents=event.documents,
                status=event.status,
            )


def _field(value: str) -> bytes:
    encoded = value.encode()
    return f"{len(encoded)}:".encode() + encoded


def row_hash(row: AuditRow, prev_hash: bytes) -> bytes:
    """What the insert trigger of migration 0005 computes, implemented independently of it."""
    micros = (row.at - _EPOCH) // timedelta(microseconds=1)
    fields = (
        str(row.seq),
        str(micros),
        row.request_id,
        row.tenant,
        row.key_id,
        row.peer,
        row.method,
        row.collection,
        str(row.documents),
        row.status,
    )
    return hashlib.sha256(prev_hash + b"".join(_field(f) for f in fields)).digest()


@dataclass(frozen=True, slots=True)
class Verification:
    rows: int
    head_seq: int
    head_hash: bytes
    broken_at: int | None
    """The first seq whose row, link or place in the sequence is wrong; None when the chain holds."""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.broken_at is None


async def verify(store: Store, *, expect: tuple[int, bytes] | None = None) -> Verification:
    """Recomputes the whole chain. `expect` (seq, hash): a head recorded earlier, which must still be there."""
    prev, expected_seq, count, seen_expect = _GENESIS, 1, 0, expect is None
    async with store.connection() as conn:
        async for row in audit_rows.rows(conn):
            reason = ""
            if row.seq != expected_seq:
                reason = f"rows {expected_seq}..{row.seq - 1} are missing"
            elif row.prev_hash != prev:
                reason = "its link to the previous row does not match"
            elif row_hash(row, prev) != row.hash:
                reason = "its contents do not match its hash"
            elif expect is not None and row.seq == expect[0]:
                if row.hash != expect[1]:
                    reason = "it differs from the recorded head"
                seen_expect = True
            if reason:
                return Verification(
                    count, expected_seq - 1, prev, row.seq if row.seq == expected_seq else expected_seq, reason
                )
            prev, expected_seq, count = row.hash, row.seq + 1, count + 1
    if not seen_expect:
        assert expect is not None
        return Verification(count, expected_seq - 1, prev, expect[0], "the recorded head is no longer in the log")
    return Verification(count, expected_seq - 1, prev, None)
