"""One writer per chain: the chain's genesis in ``audit_chains`` and the writer's claim.

Invariants:
- A chain's writer holds a session-level advisory lock keyed by the chain id on its
  shipping connection, taken on every (re)connection before anything is shipped. A second
  process asking for the same chain is refused with `ChainTaken`, whose message names the
  holder from ``chain_writers`` (host, pid, instance, spool, since when).
- A lock still held by a dead connection of *this* process (the server has not noticed the
  cut yet) is recognised by the writer's random token and its backend is terminated; any
  other holder is another writer.
- `register` writes a chain's genesis once (``ON CONFLICT DO NOTHING``): where its events
  in this database begin, and which chain head it follows, if any.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from schemas.errors import DevicegateError
from schemas.events import GENESIS_HASH, Reason, utcnow

__all__ = ["ChainTaken", "Genesis", "Writer", "claim", "lookup", "register"]

_CLAIM_ATTEMPTS = 20


class ChainTaken(DevicegateError):
    """Another process writes this chain: this one must not."""

    reason = Reason.EVENT_LOG_UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Genesis:
    """Where a chain begins in a database, and why."""

    reason: str
    base_seq: int = 0
    base_hash: str = GENESIS_HASH
    previous: tuple[str, int, str] | None = None  # (chain_id, seq, hash) it follows


@dataclass(frozen=True, slots=True)
class Writer:
    """This process, as ``chain_writers`` names it."""

    instance: str
    spool: str
    host: str
    pid: int
    token: str
    started_at: datetime

    @classmethod
    def here(cls, instance: str, spool: str) -> Writer:
        """This process, now, with a fresh random token."""
        return cls(
            instance, spool, os.uname().nodename, os.getpid(), secrets.token_hex(8), utcnow()
        )


def lock_key(chain_id: str) -> int:
    """The advisory lock key of a chain: 64 bits of SHA-256 (hashtext's 32 could collide)."""
    digest = hashlib.sha256(b"devicegate chain writer\0" + chain_id.encode()).digest()
    return int.from_bytes(digest[:8], signed=True)


_WRITER = """
INSERT INTO chain_writers (chain_id, host, pid, instance, spool, token, backend_pid, started_at)
VALUES ($1, $2, $3, $4, $5, $6, pg_backend_pid(), $7)
ON CONFLICT (chain_id) DO UPDATE SET host = $2, pid = $3, instance = $4, spool = $5,
    token = $6, backend_pid = pg_backend_pid(), started_at = $7, seen_at = now()
"""


async def claim(conn: asyncpg.Connection, chain_id: str, writer: Writer) -> None:
    """Take the chain's writer lock on ``conn`` and name this process its writer.

    Raises:
        ChainTaken: another process holds it.
    """
    key = lock_key(chain_id)
    for _ in range(_CLAIM_ATTEMPTS):
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            await conn.execute(
                _WRITER, chain_id, writer.host, writer.pid, writer.instance, writer.spool,
                writer.token, writer.started_at,
            )  # fmt: skip
            return
        holder = await conn.fetchrow(
            "SELECT host, pid, instance, spool, token, backend_pid, started_at "
            "FROM chain_writers WHERE chain_id = $1",
            chain_id,
        )
        if holder is None or holder["token"] != writer.token:
            who = (
                "an unnamed process"
                if holder is None
                else f"{holder['instance']} (host {holder['host']}, pid {holder['pid']}, "
                f"spool {holder['spool']}, since {holder['started_at'].isoformat()})"
            )
            raise ChainTaken(
                f"chain {chain_id} is already being written by {who}; two processes must "
                "never write one chain (a copied spool directory?)"
            )
        # Our own connection from before a cut still holds it: end that session.
        await conn.execute("SELECT pg_terminate_backend($1)", holder["backend_pid"])
        await conn.execute("SELECT pg_sleep(0.05)")
    raise ChainTaken(f"chain {chain_id}: the lock of a previous connection was not released")


@dataclass(frozen=True, slots=True)
class Known:
    """What a database knows of a chain."""

    registered: bool
    head: tuple[int, str] | None  # the newest stored event, if any
    pruned_through: int = 0  # the last seq a recorded prune removed


async def lookup(conn: asyncpg.Connection, chain_id: str) -> Known | None:
    """What the database knows of ``chain_id``; None: nothing at all."""
    registered = await conn.fetchval("SELECT true FROM audit_chains WHERE chain_id = $1", chain_id)
    row = await conn.fetchrow(
        "SELECT seq, hash FROM auth_events WHERE chain_id = $1 ORDER BY seq DESC LIMIT 1",
        chain_id,
    )
    head = None if row is None else (row["seq"], row["hash"])
    pruned = await conn.fetchval(
        "SELECT coalesce(max(first_seq) - 1, 0) FROM audit_prune_points WHERE chain_id = $1",
        chain_id,
    )
    if not registered and head is None and not pruned:
        return None
    return Known(bool(registered), head, pruned)


async def register(
    conn: asyncpg.Connection, chain_id: str, genesis: Genesis, *, instance: str
) -> bool:
    """Write the chain's genesis unless it has one; True if written now."""
    previous = genesis.previous or (None, None, None)
    status = await conn.execute(
        "INSERT INTO audit_chains (chain_id, writer, instance, reason, base_seq, base_hash, "
        "previous_chain, previous_seq, previous_hash) "
        "VALUES ($1, 'gateway', $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        chain_id, instance, genesis.reason, genesis.base_seq, genesis.base_hash, *previous,
    )  # fmt: skip
    return bool(status == "INSERT 0 1")
