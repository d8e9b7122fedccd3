"""A minimal synchronous event sink for the gateway tests: one INSERT per event, chained.

Not the production sink (that is ``gateway.events.sink.SpoolSink``): it makes every recorded
event visible in ``auth_events`` as soon as ``record`` returns, which keeps the tests'
assertions simple.
"""

from __future__ import annotations

import asyncio
import json

import asyncpg

from schemas.events import GENESIS_HASH, AuthEvent

_INSERT = """
INSERT INTO auth_events (id, time, instance, type, outcome, reason, device_id, fleet,
    cert_serial, cert_fingerprint, client_id, peer_address, tls_version, tls_cipher, detail,
    chain_id, seq, prev_hash, hash)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15::jsonb,
    $16, $17, $18, $19)
"""


class PgSink:
    """Chains events on ``chain_id`` and INSERTs each one before returning."""

    def __init__(self, pool: asyncpg.Pool, chain_id: str) -> None:
        self.pool = pool
        self.chain_id = chain_id
        self.seq = 0
        self.head = GENESIS_HASH
        self.lock = asyncio.Lock()
        self.fail = False
        self.delay = 0.0  # seconds each record takes before its INSERT (a slow disk)

    async def record(self, event: AuthEvent) -> None:
        if self.fail:
            raise RuntimeError("event log unavailable (test switch)")
        if self.delay:
            await asyncio.sleep(self.delay)
        async with self.lock:
            linked = event.chained(chain_id=self.chain_id, seq=self.seq + 1, prev_hash=self.head)
            await self.pool.execute(
                _INSERT,
                linked.id,
                linked.time,
                linked.instance,
                linked.type.value,
                linked.outcome.value,
                linked.reason.value,
                linked.device_id,
                linked.fleet,
                linked.cert_serial,
                linked.cert_fingerprint,
                linked.client_id,
                linked.peer_address,
                linked.tls_version,
                linked.tls_cipher,
                json.dumps(linked.detail),
                linked.chain_id,
                linked.seq,
                linked.prev_hash,
                linked.hash,
            )
            self.seq += 1
            assert linked.hash is not None
            self.head = linked.hash
