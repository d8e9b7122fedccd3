"""Signed checkpoints of the provisioning chain (see `schemas.checkpoints`).

Every provisioning process runs `run_checkpoints`: every ``interval`` seconds (and once at
shutdown, `checkpoint_once`) it signs the chain's committed head if it moved. Several
processes share the chain; `write_checkpoint` numbers their checkpoints under the chain's
row lock, and each process appends the ones it made to its own file.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import asyncpg

from provisioning.eventlog import CHAIN_ID
from schemas.checkpoints import AuditSigner, Checkpoint, write_checkpoint

__all__ = ["checkpoint_once", "run_checkpoints"]

log = logging.getLogger("devicegate.audit.checkpoint")


async def checkpoint_once(pool: Any, signer: AuditSigner, file: Path | None) -> Checkpoint | None:
    """Sign the provisioning chain's head now, if it moved since the newest checkpoint."""
    async with pool.acquire() as conn:
        return await write_checkpoint(conn, signer, chain_id=CHAIN_ID, head=None, file=file)


async def run_checkpoints(
    pool: Any, signer: AuditSigner, file: Path | None, *, interval: float
) -> None:
    """Sign checkpoints until cancelled; a failure is logged and tried next time."""
    while True:
        await asyncio.sleep(interval)
        try:
            await checkpoint_once(pool, signer, file)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("provisioning audit checkpoint failed: %s", exc)
