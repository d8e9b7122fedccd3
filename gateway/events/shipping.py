# ruff: noqa: S608 - f-strings here only splice the constant column names of COLUMNS.
"""The SQL the event sink speaks to PostgreSQL: its connection, partitions, COPY batches.

Invariants:

- A batch is one transaction with one ``pg_notify(EVENTS_CHANNEL, {"chain_id", "min_seq",
  "max_seq", "count"})`` (``audit --follow`` reads exactly that range).
- ``replay``: a batch that may already be stored goes through the session's staging table
  and ``INSERT ... ON CONFLICT DO NOTHING``, so shipping it twice stores it once; a batch
  never tried before is COPYed straight into ``auth_events``.
- The batch moves the chain's head in ``event_chains`` (never back: a replayed batch
  leaves it), so truncation at the end is seen without a checkpoint.
- ``devicegate_ensure_partitions()`` runs on every connection (and whenever the sink asks);
  its failure is logged, not raised: two writers creating one partition race, the loser
  retries next time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import asyncpg

from gateway.events.codec import COLUMNS, Row
from schemas.notify import EVENTS_CHANNEL

__all__ = ["connect", "copy_batch", "ensure_partitions"]

log = logging.getLogger(__name__)

_SEQ = COLUMNS.index("seq")
_HASH = COLUMNS.index("hash")
_HEAD_AND_NOTIFY = """
WITH head AS (
    INSERT INTO event_chains (chain_id, seq, hash) VALUES ($3, $4, $5)
    ON CONFLICT (chain_id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash,
        updated_at = now()
    WHERE event_chains.seq < EXCLUDED.seq
)
SELECT pg_notify($1, $2)
"""
_COLUMN_LIST = ", ".join(COLUMNS)
_REPLAY = (
    f"INSERT INTO auth_events ({_COLUMN_LIST}) "
    f"SELECT {_COLUMN_LIST} FROM devicegate_stage ON CONFLICT DO NOTHING"
)
_STAGE_TYPES = {"id": "uuid", "time": "timestamptz", "detail": "jsonb", "seq": "bigint"}
_STAGE = ", ".join(f"{name} {_STAGE_TYPES.get(name, 'text')}" for name in COLUMNS)


async def connect(
    url: str, *, connect_timeout: float, command_timeout: float
) -> asyncpg.Connection:
    """A shipping connection: its staging table made and the partitions ensured."""
    conn: asyncpg.Connection = await asyncpg.connect(
        url, timeout=connect_timeout, command_timeout=command_timeout
    )
    try:
        await conn.execute(f"CREATE TEMP TABLE devicegate_stage ({_STAGE}) ON COMMIT DELETE ROWS")
        await ensure_partitions(conn)
    except BaseException:
        conn.terminate()
        raise
    return conn


async def ensure_partitions(conn: asyncpg.Connection) -> None:
    try:
        await conn.execute("SELECT devicegate_ensure_partitions()")
    except asyncpg.PostgresError as exc:
        # Two writers creating the same partition race; the loser retries next time.
        log.warning("devicegate_ensure_partitions failed: %s", exc)


async def copy_batch(
    conn: asyncpg.Connection, batch: Sequence[Row], *, chain_id: str, replay: bool
) -> None:
    """Store ``batch`` (consecutive events of ``chain_id``) and announce it, in one
    transaction; ``replay``: some of it may be stored already."""
    first, last = batch[0][_SEQ], batch[-1][_SEQ]
    notice = json.dumps(
        {"chain_id": chain_id, "min_seq": first, "max_seq": last, "count": len(batch)}
    )
    async with conn.transaction():
        if replay:
            await conn.copy_records_to_table("devicegate_stage", records=batch, columns=COLUMNS)
            await conn.execute(_REPLAY)
        else:
            await conn.copy_records_to_table("auth_events", records=batch, columns=COLUMNS)
        # The head moves in the batch's transaction: `audit verify` compares it with the
        # newest row, so rows deleted from the end are seen (one round trip, as before).
        await conn.execute(
            _HEAD_AND_NOTIFY, EVENTS_CHANNEL, notice, chain_id, last, batch[-1][_HASH]
        )
