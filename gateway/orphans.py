"""Ship an orphaned slot's spool: events a dead gateway fsynced but never shipped.

A worker killed while PostgreSQL was away leaves its events in its slot's spool; only a
worker on the same slot replays them, and a cold start takes w0..w(N-1) whatever slots the
dead instance had. So each supervisor, at start, claims the orphaned slots
(`gateway.instances.claim_orphans`) and, once its own workers are ready (or
`ORPHANS_AFTER` seconds have passed: they never wait for this), runs one ship-only
process per orphan: ``python -m gateway.serve --worker-index K --ship-only
--settings-stdin``. It opens the slot's spool with the ordinary `SpoolSink` (which
replays it: idempotent, so events already stored are not stored twice), waits until
every event is committed or `SHIP_WITHIN` passes, closes (a clean close leaves one empty
segment naming the head, so the slot is no orphan any more) and exits: 0 shipped, 1 not
(one error line; the events stay on disk for the next start). The chain is the spool's
own (its segment headers), so a spool left under another ``DEVICEGATE_INSTANCE_ID`` is
shipped to its own chain too. The supervisor releases the slot's claim when it exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Final

from gateway.events.interface import EventLogUnavailable
from gateway.events.sink import SpoolSink
from gateway.events.spool import unshipped_chain
from gateway.serve import checkpoint_policy
from schemas.settings import Settings

__all__ = ["ORPHANS_AFTER", "SHIP_WITHIN", "ship_orphan"]

log = logging.getLogger("devicegate.gateway.orphans")

SHIP_WITHIN: Final = 120.0
"""How long a ship-only process keeps trying (PostgreSQL away) before it leaves the rest."""
ORPHANS_AFTER: Final = 10.0
"""Orphans are shipped once the new workers are ready, or this many seconds after start."""


async def ship_orphan(settings: Settings, slot: int, *, within: float = SHIP_WITHIN) -> bool:
    """Replay and ship slot ``slot``'s spool; True once nothing is left unshipped.

    SIGTERM ends the wait early (what is not shipped stays in the spool).
    """
    worker = f"w{slot}"
    spool = settings.spool_dir / worker
    chain = unshipped_chain(spool)
    if chain is None:
        return True  # shipped meanwhile (or cleaned by a worker of a dead supervisor)
    name = chain.partition("#")[0]
    instance = name.rpartition("/")[0] or settings.instance_id
    if instance != settings.instance_id:
        settings = settings.model_copy(update={"instance_id": instance})
    sink = SpoolSink(
        database_url=settings.database_url,
        spool_dir=spool,
        chain_id=name,
        random_id=True,
        instance=instance,
        checkpoints=checkpoint_policy(settings, worker),
        max_bytes=settings.spool_max_bytes,
    )
    try:
        await sink.start()
    except EventLogUnavailable as exc:
        log.error("orphaned spool %s not shipped: %s; it stays on disk", spool, exc)
        return False
    pending = sink.stats.queue_depth
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    waits = [asyncio.create_task(sink.drained()), asyncio.create_task(stop.wait())]
    try:
        await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
        await sink.close()
    left = sink.stats.queue_depth
    if left:
        log.error(
            "orphaned spool %s: %d of %d events of chain %s not shipped within %g s "
            "(PostgreSQL unreachable?); they stay on disk for the next start",
            spool, left, pending, sink.chain_id, within,
        )  # fmt: skip
        return False
    log.info(
        "orphaned spool %s shipped: %d events of chain %s left by a gateway that died",
        spool, pending, sink.chain_id,
    )  # fmt: skip
    return True
