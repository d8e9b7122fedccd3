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
  events of the successful items are chained and inserted, and the transaction commits.
  The head this committer's last COMMIT left is remembered, so the events are chained
  onto it and the head row is locked by the UPDATE that moves it (one round trip instead
  of two); if another writer moved it meanwhile, nothing is written and the locked read
  runs after all (`provisioning.eventlog.append_events`);
- only after COMMIT is any caller told its result: nobody holds a certificate whose record
  might still be rolled back. If COMMIT fails, every item of the batch fails.

Items that say how they merge (`Merge`: the same kind of change, e.g. new devices on one
token) may run as one statement with their events when the whole batch is of one kind and
the head is known: one round trip (the statement is its own transaction) whatever the
batch size, instead of BEGIN, a statement per item, the events and COMMIT. That statement
writes all of the batch or nothing; on nothing (a token with fewer uses left than the
batch, a head another writer moved) the batch runs item by item as above, which refuses
exactly the items that must be refused.

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
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import asyncpg

from provisioning.eventlog import ChainHead, EventSpec, append_events
from schemas.errors import DevicegateError
from schemas.events import AuthEvent

log = logging.getLogger(__name__)

T = TypeVar("T")

Work = Callable[[Any], Awaitable[tuple[T, EventSpec | None]]]
"""The changes of one item, given the batch's connection: returns (result, event to record)."""

MergedWork = Callable[
    [Any, list[Any], list[EventSpec], ChainHead], Awaitable[list[AuthEvent] | None]
]
"""(connection, payloads, event specs, head to chain onto) -> the events stored, or None
when nothing was written. Run outside a transaction, so it must be one statement that
writes all of it or nothing (a statement is its own transaction, committed when it
returns)."""


@dataclass(frozen=True, slots=True)
class Merge:
    """How an item can run merged with the other items of a batch that share its ``key``:
    ``run`` does all of their changes and appends their events in one statement. ``result``
    and ``spec`` are what ``work`` would return when its change succeeds."""

    key: Hashable
    payload: Any
    result: Any
    spec: EventSpec
    run: MergedWork


MAX_BATCH = 64
RETRIES = 3


@dataclass(eq=False)
class _Item(Generic[T]):
    work: Work[T]
    savepoint: bool = True
    merge: Merge | None = None
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
        self._head: ChainHead | None = None  # what this committer's last COMMIT left

    async def submit(
        self, work: Work[T], *, savepoint: bool = True, merge: Merge | None = None
    ) -> T:
        """Run ``work`` in the next batch; returns its result once the batch committed.

        Args:
            savepoint: false only for work that writes nothing before it refuses (one
                statement, refusal decided by reads), where a savepoint buys nothing.
            merge: how this item may run merged with others of its kind (see `Merge`).

        Raises:
            DevicegateError: the refusal ``work`` raised (its savepoint was rolled back).
        """
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._run(), name="provisioning-committer")]
        item: _Item[T] = _Item(work, savepoint, merge)
        await self._queue.put(item)
        return await item.future

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _commit_merged(self, batch: list[_Item[Any]], expect: ChainHead) -> bool:
        """Run ``batch`` as one merged statement if it is all of one kind; False: it was not
        (or wrote nothing), and nothing of it happened."""
        merges = [item.merge for item in batch]
        first = merges[0]
        if first is None or any(m is None or m.key != first.key for m in merges):
            return False
        try:
            async with self._pool.acquire() as conn:  # no BEGIN: one statement, all or nothing
                events = await first.run(
                    conn,
                    [m.payload for m in merges if m is not None],
                    [m.spec for m in merges if m is not None],
                    expect,
                )
            if events is None:
                return False
        except Exception as exc:  # decided again item by item, where each failure is handled
            expected = isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError)
            log.log(
                logging.INFO if expected else logging.WARNING,
                "a merged batch of %d failed (%r); running it item by item",
                len(batch),
                exc,
                exc_info=not expected,
            )
            return False
        self._head = ChainHead.after(events)
        for item, merge in zip(batch, merges, strict=True):
            assert merge is not None
            item.attempts += 1
            if not item.future.done():  # the caller may have gone away
                item.future.set_result(merge.result)
        return True

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._commit(batch)

    async def _commit(self, batch: list[_Item[Any]]) -> None:
        expect, self._head = self._head, None  # known again only after this COMMIT
        if expect is not None and await self._commit_merged(batch, expect):
            return
        outcomes: list[tuple[bool, Any]] = []
        retry: list[_Item[Any]] = []
        head: ChainHead | None = None
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
                if specs:
                    head = ChainHead.after(await append_events(conn, specs, expect=expect))
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
        self._head = head or expect
        for item in retry:
            self._queue.put_nowait(item)
        for item, (ok, value) in zip(batch, outcomes, strict=True):
            if item.future.done() or item in retry:  # the caller went away, or next batch
                continue
            if ok:
                item.future.set_result(value)
            else:
                item.future.set_exception(value)
