"""Group commit for the device-facing writes (enrollment, renewal, their refusals).

Why: every provisioning event is chained, so its transaction holds the chain head's row
lock through COMMIT, and COMMIT waits for the WAL flush. One enrollment per transaction
therefore caps the whole service at one fsync per enrollment (~5 ms here: <= 200/s, whatever
the concurrency). The committer runs many enrollments in one transaction instead:

- each item's changes run inside their own SAVEPOINT, so a refused item (token exhausted,
  hardware id taken) rolls back alone, its token use included, and the others stand. Work
  that is a single statement and refuses only before writing anything may skip the
  savepoint (two round trips); a database error in it then fails the whole batch;
- then the chain head is locked (last, as in every writer: no lock-order deadlocks), the
  events of the successful items are chained and inserted, and the transaction commits;
- only after COMMIT is any caller told its result: nobody holds a certificate whose record
  might still be rolled back. If COMMIT fails, every item of the batch fails.

One writer task per process: two batches of one process, each locking several token or
device rows, could otherwise deadlock on each other. Batches of different processes (several
replicas) still can; PostgreSQL then aborts one statement, whose item is retried in the next
batch (its savepoint was rolled back, the rest of the batch stands; when the aborted
statement had no savepoint, the whole batch is retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import asyncpg

from provisioning.eventlog import EventSpec, append_events
from schemas.errors import DevicegateError

log = logging.getLogger(__name__)

T = TypeVar("T")

Work = Callable[[Any], Awaitable[tuple[T, EventSpec | None]]]
"""The changes of one item, given the batch's connection: returns (result, event to record)."""

MAX_BATCH = 64
RETRIES = 3


@dataclass(eq=False)
class _Item(Generic[T]):
    work: Work[T]
    savepoint: bool = True
    attempts: int = 0
    future: asyncio.Future[T] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Committer:
    """Runs submitted work in shared transactions on connections of ``pool``."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._queue: asyncio.Queue[_Item[Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def submit(self, work: Work[T], *, savepoint: bool = True) -> T:
        """Run ``work`` in the next batch; returns its result once the batch committed.

        Args:
            savepoint: false only for work that writes nothing before it refuses (one
                statement, refusal decided by reads), where a savepoint buys nothing.

        Raises:
            DevicegateError: the refusal ``work`` raised (its savepoint was rolled back).
        """
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._run(), name="provisioning-committer")]
        item: _Item[T] = _Item(work, savepoint)
        await self._queue.put(item)
        return await item.future

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._commit(batch)

    async def _commit(self, batch: list[_Item[Any]]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        retry: list[_Item[Any]] = []
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                specs: list[EventSpec] = []
                for item in batch:
                    item.attempts += 1
                    if not item.savepoint:
                        try:
                            result, spec = await item.work(conn)
                        except DevicegateError as exc:  # refused before writing anything
                            outcomes.append((False, exc))
                            continue
                        # any other error escapes: the transaction is aborted, the batch fails
                        outcomes.append((True, result))
                        if spec is not None:
                            specs.append(spec)
                        continue
                    try:
                        async with conn.transaction():  # SAVEPOINT: a refusal undoes only this
                            result, spec = await item.work(conn)
                    except asyncpg.DeadlockDetectedError as exc:
                        if item.attempts < RETRIES:
                            retry.append(item)
                        outcomes.append((False, exc))
                        continue
                    except Exception as exc:  # a refusal, or a bug in this item only
                        if not isinstance(exc, DevicegateError):
                            log.exception("a provisioning write failed")
                        outcomes.append((False, exc))
                        continue
                    outcomes.append((True, result))
                    if spec is not None:
                        specs.append(spec)
                await append_events(conn, specs)
        except Exception as exc:  # the batch did not commit: nothing of it happened
            deadlock = isinstance(exc, asyncpg.DeadlockDetectedError)
            if not deadlock:
                log.exception("a provisioning batch of %d failed to commit", len(batch))
            for item in batch:
                if item.future.done():
                    continue
                if deadlock and item.attempts < RETRIES:  # lost to another process: again
                    self._queue.put_nowait(item)
                else:
                    item.future.set_exception(exc)
            return
        for item in retry:
            self._queue.put_nowait(item)
        for item, (ok, value) in zip(batch, outcomes, strict=True):
            if item.future.done() or item in retry:  # the caller went away, or next batch
                continue
            if ok:
                item.future.set_result(value)
            else:
                item.future.set_exception(value)
