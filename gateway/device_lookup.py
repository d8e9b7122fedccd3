"""`LookupBatcher`: the revocation cache's misses, coalesced into one query per batch.

After a gateway restart every device misses the cache at once (a reconnect storm). One
query per device queued thousands of lookups on a pool of four connections, and a lookup
that waited longer than its timeout refused a good device (``revocation_state_stale``).

Invariants:

* At most one query is in flight; misses that arrive while it runs wait for the next one,
  which carries up to ``max_batch`` of them. The same (device, serial) asked twice while
  pending is looked up once.
* The timeout covers the query, not the time spent waiting for it.
* A failed query fails every lookup of its batch with the same exception; a waiter that
  gave up (cancelled) never cancels the lookup for the others.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeAlias

import asyncpg

__all__ = ["BATCH_LOOKUP", "LookupBatcher", "Row"]

BATCH_LOOKUP: Final = """
SELECT k.device_id, k.serial, d.status AS device_status, d.fleet,
       c.status AS cert_status, c.device_id AS cert_device
FROM unnest($1::text[], $2::text[]) AS k(device_id, serial)
JOIN devices d ON d.device_id = k.device_id
LEFT JOIN certificates c ON c.serial = k.serial
"""

Row: TypeAlias = Mapping[str, Any]  # an asyncpg.Record
Key: TypeAlias = tuple[str, str]
Fetch: TypeAlias = Callable[[list[str], list[str]], Awaitable[Sequence[Row]]]


def _retrieve(future: asyncio.Future[Row | None]) -> None:
    # A waiter may have given up: read the exception so asyncio does not log it as lost.
    if not future.cancelled():
        future.exception()


class LookupBatcher:
    """Looks up (device id, certificate serial) pairs through ``fetch``, many per query.

    Args:
        fetch: Runs `BATCH_LOOKUP` (or its equal) for parallel lists of device ids and
            serials and returns the rows found, each with ``device_id`` and ``serial``.
        max_batch: Most pairs per query.
    """

    def __init__(self, fetch: Fetch, *, max_batch: int = 1000) -> None:
        self._fetch = fetch
        self._max_batch = max_batch
        self._pending: dict[Key, asyncio.Future[Row | None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.queries = 0

    async def lookup(self, device_id: str, serial: str) -> Row | None:
        """The row of ``device_id`` (with the status of ``serial``), or None if unknown."""
        key = (device_id, serial)
        future = self._pending.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            future.add_done_callback(_retrieve)
            self._pending[key] = future
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(
                    self._run(), name="device-lookups"
                )
        return await asyncio.shield(future)

    async def _run(self) -> None:
        try:
            while self._pending:
                keys = list(itertools.islice(self._pending, self._max_batch))
                batch = {key: self._pending.pop(key) for key in keys}
                try:
                    self.queries += 1
                    rows = await self._fetch([d for d, _ in keys], [s for _, s in keys])
                except Exception as exc:
                    for future in batch.values():
                        if not future.done():
                            future.set_exception(exc)
                    continue
                except BaseException:  # stopped mid-query: its lookups fail like the rest
                    self._pending.update(batch)
                    raise
                found = {(row["device_id"], row["serial"]): row for row in rows}
                for key, future in batch.items():
                    if not future.done():
                        future.set_result(found.get(key))
        finally:
            self._task = None
            for future in self._pending.values():  # cancelled with lookups still pending
                if not future.done():
                    future.set_exception(asyncpg.InterfaceError("the lookups were stopped"))
            self._pending.clear()

    async def close(self) -> None:
        """Stop; pending lookups fail."""
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
