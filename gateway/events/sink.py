"""The durable auth event sink: spool to local disk with group commit, ship to PostgreSQL.

`SpoolSink.record` chains the event (``chain_id``, ``seq``, ``prev_hash``, ``hash``), appends
it to this worker's spool and returns once the spool is fsynced. A background task ships
fsynced events to ``auth_events`` with COPY and deletes spool segments after the commit.
Each committed batch sends one ``pg_notify(EVENTS_CHANNEL, {"chain_id", "min_seq",
"max_seq", "count"})`` in its transaction (``audit --follow`` reads exactly that range).
Shipping calls ``devicegate_ensure_partitions()`` on every (re)connection and hourly.

Invariants:

- Chain order is spool order: seq and prev_hash are assigned synchronously in `record`, in
  the order the frames are written, so the spool is a prefix-closed copy of the chain.
- `record` returns only after the fsync covering its frame; concurrent calls share one
  fsync (group commit): while one fsync runs, new events gather for the next (optionally
  spaced ``flush_interval`` apart). The gathering group is queued to the I/O thread with
  its first event and sealed by the thread when its write begins, so the thread goes from
  one fsync to the next without a trip through the event loop.
- Only fsynced events are shipped: an event in PostgreSQL is always also in the spool (or
  already released), so a restarted worker resumes its chain from the spool tail and never
  reuses a seq that PostgreSQL holds.
- Shipping is idempotent: a batch that may already be stored (recovered from the spool
  after a restart, or whose commit outcome is unknown) goes through a staging table and
  ``INSERT ... ON CONFLICT DO NOTHING``; a batch never tried before is COPYed straight in.
- A spool segment is deleted only after every event in it is committed.
- Bounded spool, refusals still recorded: an *admission* (an allowed ``connect``) is refused
  with `EventLogUnavailable` once the spool would grow past ``max_bytes - reserve_bytes``,
  or while its filesystem is out of space (a spare segment could not be made); every other
  event (the refusal that follows, denials, session ends) may use the reserve up to
  ``max_bytes``. The gateway thus refuses new sessions rather than admit unaudited ones,
  and the refusals themselves are in the log. It admits again as soon as shipping (or the
  disk) frees space.
- Loss is recorded: a non-admission event refused for lack of space is counted, and the
  first write that succeeds afterwards carries one ``events_lost`` event (reason
  ``event_log_unavailable``) with the count by type and reason and the first and last
  time. The count lives in memory: a worker killed while it is non-zero loses it.
- No space on the disk (ENOSPC) is not fatal: the group whose write failed is refused (its
  seqs are reused, nothing of it is durable) and later groups are tried again. Any other
  write or fsync failure is fatal for the sink (the page cache state is unknown
  afterwards): every later `record` raises `EventLogUnavailable`, and every `record`
  waiting for a flush is woken with it (also when the shipping task dies).

Chain identity across restarts: the chain id is given by the caller (one per worker, stable
across restarts, e.g. ``<instance>/w<N>``). At start the head comes from the spool (each
segment header records the head before it, and the active segment is never deleted); a
spool directory without segments takes the head from PostgreSQL. If PostgreSQL is
unreachable at that moment the sink starts a new chain, ``<chain_id>#<uuid7>``, rather than
guess a head and fork the old one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import Self

import asyncpg

from gateway.database import DB_ERRORS
from gateway.events import registry, shipping
from gateway.events.checkpoints import CheckpointClock, CheckpointPolicy
from gateway.events.codec import COLUMNS, Row, decode_payload, encode_event
from gateway.events.group import DROPPED, OPEN, SEALED, Group, Refused, SharedFuture
from gateway.events.interface import EventLogUnavailable, SinkObserver, SinkStats
from gateway.events.loss import LostEvents, is_admission
from gateway.events.registry import ChainTaken, Genesis
from gateway.events.spool import Recovered, Spool, SpoolError, SpoolFull, frame
from schemas.checkpoints import write_checkpoint
from schemas.events import GENESIS_HASH, AuthEvent, EventType, Outcome, Reason, uuid7

__all__ = ["SpoolSink"]

log = logging.getLogger(__name__)

_SEQ = COLUMNS.index("seq")
_HASH = COLUMNS.index("hash")
_PREV = COLUMNS.index("prev_hash")
_TYPE = COLUMNS.index("type")
_OUTCOME = COLUMNS.index("outcome")
_RETRY_MIN = 0.05
_HEADER_SLACK = 512  # at least a segment header's size (magic, length, chain JSON)
_PARTITION_CHECK_EVERY = 3600.0


# -- the sink ------------------------------------------------------------------------------


class SpoolSink:
    """Durable `EventSink` of one gateway worker.

    Usage::

        async with SpoolSink(database_url=url, spool_dir=Path("spool/w0"),
                             chain_id="gw-1/w0") as sink:
            await sink.record(event)      # durable on local disk when this returns
            sink.stats                    # SinkStats snapshot for metrics

    Args:
        database_url: PostgreSQL URL events are shipped to.
        spool_dir: this worker's own spool directory (locked while the sink is open).
        chain_id: the name of this worker's chain (``<instance>/w<N>``); keep it stable
            across restarts. The chain id is the spool's: this name, ``#`` and a random
            part when the spool was made (see ``random_id``).
        max_bytes: spool size on disk (segments are preallocated) at which `record`
            raises `EventLogUnavailable`; ``Settings.spool_max_bytes``.
        reserve_bytes: the top of ``max_bytes`` that admissions may not use, kept for the
            refusals and other events that follow (default: an eighth of ``max_bytes``, at
            least one segment, at most a quarter).
        flush_interval: minimum seconds between two fsyncs. 0 (the default) is back-to-back
            group commit: an idle sink answers in one fsync, and under load every event
            recorded while one fsync runs shares the next. A few ms trades latency for
            fewer fsyncs on disks where they are expensive.
        ship_interval: how long a partial batch waits for more events before it is
            shipped (fewer, larger transactions, and fewer WAL fsyncs competing with the
            spool's).
        batch_size: most events per COPY batch.
        segment_bytes: size of each preallocated segment file (default: max_bytes / 8,
            between 4 KiB and 4 MiB).
        retry_max: longest wait between two attempts to reach PostgreSQL.
        drain_timeout: how long `close` keeps shipping before leaving events in the spool.
        connect_timeout: timeout of one connection attempt.
        command_timeout: timeout of one statement (a COPY batch included).
        metrics: told the duration of each group commit and the size of each shipped batch
            (`gateway.telemetry.GatewayMetrics`); ``None``: nobody is told.
        random_id: a spool without segments begins ``<chain_id>#<random>`` (the gateway's
            choice); otherwise ``chain_id`` itself, unless the database knows that chain.
        instance: this writer's instance name in ``chain_writers`` and ``audit_chains``
            (default: ``chain_id`` up to its last ``/``).
        checkpoints: sign checkpoints of the committed head (None: none).
    """

    def __init__(
        self,
        *,
        database_url: str,
        spool_dir: Path,
        chain_id: str,
        max_bytes: int = 256 * 1024 * 1024,
        reserve_bytes: int | None = None,
        flush_interval: float = 0.0,
        ship_interval: float = 0.025,
        batch_size: int = 5000,
        segment_bytes: int | None = None,
        retry_max: float = 2.0,
        drain_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
        metrics: SinkObserver | None = None,
        random_id: bool = False,
        instance: str | None = None,
        checkpoints: CheckpointPolicy | None = None,
    ) -> None:
        self._url = database_url
        self._name = chain_id
        self._random_id = random_id
        self._instance = instance or chain_id.rpartition("/")[0] or chain_id
        self._writer = registry.Writer.here(self._instance, str(spool_dir))
        self._genesis: Genesis | None = None  # written at the first claim, if any
        self._behind: tuple[int, int] | None = None  # seqs the database lacks (found at start)
        self._clock = CheckpointClock(checkpoints) if checkpoints is not None else None
        self._metrics = metrics
        self._chain_id = chain_id
        self._max_bytes = max_bytes
        self._flush_interval = flush_interval
        self._ship_interval = ship_interval
        self._batch_size = batch_size
        self._retry_max = retry_max
        self._drain_timeout = drain_timeout
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        if segment_bytes is None:
            segment_bytes = min(max(max_bytes // 8, 4096), 4 * 1024 * 1024)
        if reserve_bytes is None:
            reserve_bytes = min(max(segment_bytes, max_bytes // 8), max_bytes // 4)
        self._admit_bytes = max_bytes - reserve_bytes  # the soft limit, for admissions
        # The most `_footprint` can add to the spool's bytes (two groups, two rotations): at
        # most one group is being written and one gathering (a dropped one does not count).
        self._two_rotations = 2 * (segment_bytes + _HEADER_SLACK)
        self._spool = Spool(spool_dir, segment_bytes=segment_bytes)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="devicegate-spool")
        # Preallocates the next segment while the current one fills (see Spool.prepare_spare).
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="devicegate-spare")

        self._head_seq = 0
        self._head_digest = bytes.fromhex(GENESIS_HASH)
        # Groups queued to the I/O thread whose outcome the loop has not handled yet, oldest
        # first; the last may be the open one new frames join.
        self._unwritten: deque[Group] = deque()
        self._unwritten_bytes = 0
        self._open: Group | None = None
        self._seal = threading.Lock()  # guards `Group.state`, shared with the I/O thread
        self._epoch = 0  # advanced by each roll-back: groups chained on a failed one are refused
        self._refused_epoch = -1  # I/O thread: groups of this epoch or older are not written
        self._last_write = 0.0  # I/O thread: when the last write began (``flush_interval``)
        # The head as of the last successful append: where a failed (no space) group's
        # seqs roll back to.
        self._durable_seq = 0
        self._durable_digest = self._head_digest
        self._lost = LostEvents()
        self._lost_total = 0
        self._missing_total = 0  # database behind spool: seqs it lacked at start
        self._durable: deque[Row] = deque()  # fsynced, not yet committed in PostgreSQL
        self._uncertain_seq = 0  # events up to this seq may already be in PostgreSQL

        self._ship_wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._conn: asyncpg.Connection | None = None
        self._started = False
        self._closing = False
        self._last_frame = 0  # size of the last frame: "full" means the next one won't fit
        self._failed: BaseException | None = None
        self._next_partition_check = 0.0

        self._recorded = 0
        self._shipped = 0
        self._fsyncs = 0
        self._batches = 0
        self._ship_failures = 0
        self._last_batch_size = 0
        self._last_flush_latency = 0.0
        self._last_ship_latency = 0.0

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Recover the spool, find the chain head, and start flushing and shipping.

        Raises:
            EventLogUnavailable: the spool is locked by another process or unusable.
        """
        loop = asyncio.get_running_loop()
        try:
            recovered = await loop.run_in_executor(self._io, self._spool.open)
        except (SpoolError, OSError) as exc:
            self._shutdown_threads()
            raise EventLogUnavailable(f"event spool unavailable: {exc}") from exc
        if recovered.chain_id is not None and recovered.chain_id.partition("#")[0] != self._name:
            await loop.run_in_executor(self._io, self._spool.close)
            self._shutdown_threads()
            raise EventLogUnavailable(
                f"spool {self._spool.directory} belongs to chain {recovered.chain_id}, "
                f"not {self._name}"
            )
        conn = await self._try_connect()
        try:
            if recovered.chain_id is not None:
                self._adopt(recovered)
                if conn is not None:
                    await self._reconcile(conn)
            else:
                await self._begin(conn)
            if conn is not None:
                await self._claim(conn)
        except ChainTaken as exc:
            await self._abandon_start()
            raise EventLogUnavailable(str(exc)) from exc
        except DB_ERRORS as exc:  # e.g. not migrated yet: claimed at the next connection
            log.warning("chain %s not claimed at start: %s", self._chain_id, exc)
            await self._drop_connection()
        try:
            await loop.run_in_executor(
                self._io,
                self._spool.start_segment,
                self._chain_id,
                self._head_seq,
                self._head_digest.hex(),
            )
        except SpoolFull as exc:
            if not self._spool.segments:
                await self._abandon_start()
                raise EventLogUnavailable(f"event spool unavailable: {exc}") from exc
            # Carry on in the newest segment; admissions wait until the disk has room.
            log.warning("event spool disk full at start: appending to the newest segment")
            await loop.run_in_executor(self._io, self._spool.resume, self._chain_id)
        except (SpoolError, OSError) as exc:
            await self._abandon_start()
            raise EventLogUnavailable(f"event spool unavailable: {exc}") from exc
        self._spool.set_head(self._head_digest.hex())
        self._durable_seq, self._durable_digest = self._head_seq, self._head_digest
        self._started = True
        self._tasks = [
            asyncio.create_task(self._ship_loop(), name=f"spool-ship:{self._chain_id}"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_done)
        if self._durable:
            self._ship_wake.set()
        else:
            self._drained.set()
        if self._behind is not None:
            self._append(_missing_event(self._name, self._chain_id, *self._behind), False)

    async def _abandon_start(self) -> None:
        await self._drop_connection()
        await asyncio.get_running_loop().run_in_executor(self._io, self._spool.close)
        self._shutdown_threads()

    def _shutdown_threads(self) -> None:
        self._prep.shutdown(wait=False)
        self._io.shutdown(wait=False)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # a bug: refuse events rather than pile them up unshipped
            log.critical("event sink task %s died: %r", task.get_name(), exc)
            self._failed = exc
            # Wake the records waiting for the gathering group, with the failure.
            self._drop_open(EventLogUnavailable(f"event spool failed: {exc}"))

    async def _try_connect(self) -> asyncpg.Connection | None:
        try:
            self._conn = await self._connect()
        except DB_ERRORS as exc:
            log.warning("PostgreSQL unreachable at start (%s): shipping will retry", exc)
        return self._conn

    def _adopt(self, recovered: Recovered) -> None:
        """Continue the spool's chain; its genesis, should the database not know it, is
        the head before the first event still to ship."""
        assert recovered.chain_id is not None and recovered.head_seq is not None
        assert recovered.head_hash is not None
        self._chain_id = recovered.chain_id
        self._head_seq = recovered.head_seq
        self._head_digest = bytes.fromhex(recovered.head_hash)
        rows = [decode_payload(payload) for payload in recovered.payloads]
        self._durable.extend(rows)
        self._uncertain_seq = self._head_seq  # any of them may have been shipped
        base = (
            (rows[0][_SEQ] - 1, rows[0][_PREV]) if rows else (self._head_seq, recovered.head_hash)
        )
        reason = "genesis" if base[0] == 0 else "spool_history_unknown_to_database"
        self._genesis = Genesis(reason, *base)
        log.info(
            "spool recovered: chain %s at seq %d, %d events to replay",
            self._chain_id, self._head_seq, len(rows),
        )  # fmt: skip

    async def _reconcile(self, conn: asyncpg.Connection) -> None:
        """Compare the spool's chain with what the database holds of it (see the module
        docstring: unknown, behind the spool, ahead of it)."""
        known = await registry.lookup(conn, self._chain_id)
        first_unshipped = self._durable[0][_SEQ] if self._durable else self._head_seq + 1
        if known is None:
            if not self._durable:  # all shipped elsewhere: a fresh database
                await self._new_chain(
                    "database_did_not_know_chain",
                    (self._chain_id, self._head_seq, self._head_digest.hex()),
                )
            return  # else: its genesis is the first event still to ship
        if known.registered:
            self._genesis = None
        else:
            self._genesis = Genesis("registered_late")
        db_seq, db_hash = known.head or (0, GENESIS_HASH)
        db_seq = max(db_seq, known.pruned_through)
        if db_seq > self._head_seq:
            log.warning(
                "the database holds chain %s up to seq %d, this spool only to %d (a spool "
                "restored from a copy?): beginning a new chain",
                self._chain_id, db_seq, self._head_seq,
            )  # fmt: skip
            await self._new_chain("spool_behind_database", (self._chain_id, db_seq, db_hash))
        elif db_seq < first_unshipped - 1:
            self._behind = (db_seq + 1, first_unshipped - 1)
            self._missing_total += first_unshipped - 1 - db_seq
            log.error(
                "DATABASE BEHIND SPOOL: chain %s: seqs %d..%d were shipped but the database "
                "lacks them (restored from an older backup?); recorded as events_missing",
                self._chain_id, *self._behind,
            )  # fmt: skip

    async def _begin(self, conn: asyncpg.Connection | None) -> None:
        """A spool without segments: a new chain (never one the database knows)."""
        self._genesis = Genesis("genesis")
        if self._random_id or conn is None:
            self._chain_id = f"{self._name}#{uuid7().hex}"
            return
        known = await registry.lookup(conn, self._name)
        if known is not None:  # never continue it: its head is the database's word only
            previous = known.head and (self._name, *known.head)
            self._chain_id = f"{self._name}#{uuid7().hex}"
            self._genesis = Genesis("new_spool", previous=previous or None)

    async def _new_chain(self, reason: str, previous: tuple[str, int, str]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._io, self._spool.discard)
        self._durable.clear()
        self._chain_id = f"{self._name}#{uuid7().hex}"
        self._head_seq, self._head_digest, self._uncertain_seq = 0, bytes.fromhex(GENESIS_HASH), 0
        self._genesis = Genesis(reason, previous=previous)
        log.warning(
            "chain %s begins after chain %s at seq %d (%s)", self._chain_id, *previous[:2], reason
        )

    async def _claim(self, conn: asyncpg.Connection) -> None:
        """Take the chain's writer lock on ``conn``; write its genesis if it has none."""
        await registry.claim(conn, self._chain_id, self._writer)
        if self._genesis is not None:
            await registry.register(conn, self._chain_id, self._genesis, instance=self._instance)
            self._genesis = None

    async def close(self) -> None:
        """Flush, ship what can be shipped within ``drain_timeout``, and stop.

        Events not shipped stay in the spool and are replayed by the next start.
        """
        if self._closing:
            return
        if self._started and self._failed is None and self._lost.count:
            self._record_loss()
        self._closing = True
        if self._started:
            if self._lost.count:
                log.error("closing with the loss of %d events unrecorded", self._lost.count)
            pending = [group.future for group in self._unwritten]  # the last groups
            await asyncio.gather(*map(asyncio.shield, pending), return_exceptions=True)
            drained = True
            try:
                await asyncio.wait_for(self._drained.wait(), self._drain_timeout)
            except TimeoutError:
                drained = False
                log.warning(
                    "closing with %d events not shipped; they stay in the spool",
                    len(self._durable),
                )
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if drained and self._failed is None and self._clock is not None:
                await self._final_checkpoint()
            if drained and self._failed is None:
                # Everything is committed: leave only an empty segment naming the head.
                await asyncio.get_running_loop().run_in_executor(
                    self._io, functools.partial(self._spool.release, self._head_seq, rotate=True)
                )
        await self._drop_connection()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, functools.partial(self._prep.shutdown, wait=True))
        await loop.run_in_executor(self._io, self._spool.close)
        self._io.shutdown(wait=True)

    async def _final_checkpoint(self) -> None:
        """At shutdown: sign the head everything was shipped up to, if not signed yet."""
        assert self._clock is not None
        if self._clock.due() is None:
            return
        try:
            await asyncio.wait_for(self._checkpoint(), self._drain_timeout)
        except TimeoutError:
            log.warning("closing without a final audit checkpoint of %s", self._chain_id)

    async def drained(self) -> None:
        """Return once every event recorded so far is committed in PostgreSQL (the sink
        stays open; a partial batch still waits ``ship_interval`` for company first)."""
        await self._drained.wait()

    # -- recording ---------------------------------------------------------------------

    async def record(self, event: AuthEvent) -> None:
        """Chain ``event``, append it to the spool, and return once it is fsynced.

        The event's own chain fields, if any, are ignored: this sink assigns them.

        Raises:
            EventLogUnavailable: the spool is full (an admission: at its soft limit or out
                of disk space; any other event: at ``max_bytes``), failed, or the sink is
                not running.
        """
        if self._failed is not None:
            raise EventLogUnavailable(f"event spool failed: {self._failed}")
        if not self._started or self._closing:
            raise EventLogUnavailable("event sink is not running")
        if self._lost.count:
            self._record_loss()
        # Identity checks: the model holds enum members (`is_admission` for rows).
        admission = event.type is EventType.CONNECT and event.outcome is Outcome.ALLOWED
        await self._append(event, admission)

    def _append(self, event: AuthEvent, admission: bool, *, loss: bool = False) -> SharedFuture:
        """Chain and gather ``event`` for the next flush; the future that flush resolves.

        ``loss``: ``event`` is the ``events_lost`` event; while the disk is full it only
        goes where no new segment is needed (other events probe whether space is back).
        """
        seq = self._head_seq + 1
        payload, digest, row = encode_event(
            event, chain_id=self._chain_id, seq=seq, prev_digest=self._head_digest
        )
        framed = frame(payload)
        size = self._last_frame = len(framed)
        spool = self._spool
        if (  # the usual case skips the exact check: far below the soft limit, disk fine
            spool.no_space
            or spool.bytes + self._unwritten_bytes + size + self._two_rotations > self._admit_bytes
        ) and (
            self._refuses(size, admission)
            or (loss and spool.no_space and self._footprint(size) > spool.bytes)
        ):
            if not (admission or loss):  # an admission's loss is its refusal's event
                self._lost_total += self._lost.add(row)
            if admission and spool.no_space:
                raise EventLogUnavailable("event spool disk is full; refusing new sessions")
            raise EventLogUnavailable(
                f"event spool full ({spool.bytes} bytes, limit {self._max_bytes}); "
                "PostgreSQL unreachable?"
            )
        self._head_seq = seq
        self._head_digest = digest
        self._recorded += 1
        self._unwritten_bytes += size
        group = self._open
        if group is not None:
            with self._seal:
                if group.state is OPEN:
                    group.add(framed, row)
                    return group.future
        # No group is gathering (or the I/O thread just sealed it): begin the next one.
        group = self._open = Group(self._epoch)
        group.add(framed, row)
        self._unwritten.append(group)
        self._drained.clear()
        written = asyncio.get_running_loop().run_in_executor(self._io, self._write, group)
        written.add_done_callback(functools.partial(self._written, group))
        return group.future

    def _refuses(self, size: int, admission: bool) -> bool:
        """Whether a frame of ``size`` bytes must be refused (see the module invariants)."""
        if admission:
            if self._spool.no_space:
                return True
            limit = self._admit_bytes
        else:
            limit = self._max_bytes
        return self._footprint(size) > limit

    def _footprint(self, extra: int) -> int:
        """Spool bytes on disk once the groups not yet written and ``extra`` bytes are
        appended: each group fills the active segment or begins the next one (a group
        never straddles two segments). ``extra`` joins the open group, if there is one."""
        spool = self._spool
        total = spool.bytes
        if not spool.segments:
            return total + extra
        active = spool.segments[-1]
        room = active.allocated - active.size
        # A group the thread has written is in `spool.bytes` already (it sets `written`
        # after the spool's counters), and a dropped one will never be written.
        sizes = [g.size for g in self._unwritten if not g.written and g.state is not DROPPED]
        if sizes and self._open is not None and self._open.state is OPEN:
            sizes[-1] += extra
        else:
            sizes.append(extra)
        for group in sizes:
            if group <= room:
                room -= group
            else:
                grown = max(spool.segment_bytes, group + _HEADER_SLACK)
                total += grown
                room = grown - group - _HEADER_SLACK
        return total

    def _record_loss(self) -> None:
        """Gather one ``events_lost`` event for the events lost so far, if it fits now."""
        lost = self._lost
        try:
            future = self._append(lost.event(self._chain_id), False, loss=True)
        except EventLogUnavailable:
            return  # still no room: keep counting
        self._lost = LostEvents()
        future.add_done_callback(functools.partial(_loss_recorded, lost.count))

    def _write(self, group: Group) -> float:
        """In the I/O thread: seal ``group``, append it to the spool and fdatasync; returns
        the seconds the write took.

        Raises:
            Refused: an earlier group of its epoch failed, so its frames are chained on
                records that are not on disk; nothing is written.
            SpoolFull, OSError: as `Spool.append`.
        """
        if self._flush_interval:
            wait = self._last_write + self._flush_interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        with self._seal:
            if group.state is DROPPED:
                return 0.0
            group.state = SEALED
        if group.epoch <= self._refused_epoch:
            raise Refused
        started = self._last_write = time.monotonic()
        last = group.rows[-1]
        try:
            self._spool.append(b"".join(group.frames), last[_SEQ], last[_HASH])
        except SpoolFull:
            self._refused_epoch = group.epoch
            raise
        except BaseException:
            self._refused_epoch = sys.maxsize  # fatal: nothing is written after it
            raise
        group.written = True
        return time.monotonic() - started

    def _written(self, group: Group, written: asyncio.Future[float]) -> None:
        """In the loop, in queue order: settle ``group``'s records after its write."""
        assert self._unwritten[0] is group
        self._unwritten.popleft()
        self._unwritten_bytes -= group.size
        if self._open is group:
            self._open = None
        self._ship_wake.set()  # new rows to ship, or the ship loop re-checks `drained`
        if group.state is DROPPED:
            return  # its records were failed when it was dropped
        exc = written.exception()
        rows = group.rows
        if exc is None:
            self._durable_seq = rows[-1][_SEQ]
            self._durable_digest = bytes.fromhex(rows[-1][_HASH])
            self._fsyncs += 1
            self._last_flush_latency = written.result()
            if self._metrics is not None:
                self._metrics.flushed(self._last_flush_latency)
            if self._spool.wants_spare():
                self._prep.submit(self._spool.prepare_spare).add_done_callback(_log_failure)
            self._durable.extend(rows)
            group.future.set_result(None)
        elif isinstance(exc, SpoolFull):
            self._roll_back(group, exc)
        elif isinstance(exc, Refused) and self._failed is None:
            self._lose(group, EventLogUnavailable("event spool out of disk space"))
        elif isinstance(exc, Refused):
            error = EventLogUnavailable(f"event spool write failed: {self._failed}")
            self._fail_group(group, error)
        else:
            log.critical("event spool write failed, refusing further events: %s", exc)
            self._failed = exc
            # The group gathering behind it is refused by the I/O thread (see `_write`).
            self._fail_group(group, EventLogUnavailable(f"event spool write failed: {exc}"))

    def _roll_back(self, group: Group, exc: SpoolFull) -> None:
        """The disk had no room for ``group``: nothing of it is durable. Refuse it and the
        group chained behind it, and continue the chain from the last durable record."""
        error = EventLogUnavailable(f"event spool out of disk space: {exc}")
        self._epoch += 1  # the groups queued behind it are refused by the I/O thread
        self._head_seq, self._head_digest = self._durable_seq, self._durable_digest
        self._lose(group, error)
        refused = len(group.rows)
        behind = self._open
        if behind is not None and self._drop_open(error):
            self._count_lost(behind.rows)
            refused += len(behind.rows)
        log.warning("event spool out of disk space: %d events refused", refused)
        if self._spool.wants_spare():  # the disk may have room again by the next group
            self._prep.submit(self._spool.prepare_spare).add_done_callback(_log_failure)

    def _drop_open(self, error: EventLogUnavailable) -> bool:
        """Fail the gathering group unless the I/O thread has sealed it; True if dropped."""
        group, self._open = self._open, None
        if group is None:
            return False
        with self._seal:
            if group.state is not OPEN:
                return False  # sealed: its write (or refusal) settles it
            group.state = DROPPED
        self._fail_group(group, error)
        return True

    def _fail_group(self, group: Group, error: EventLogUnavailable) -> None:
        self._recorded -= len(group.rows)  # they were never recorded after all
        _fail(group.future, error)

    def _lose(self, group: Group, error: EventLogUnavailable) -> None:
        """Refuse ``group`` for lack of space, counting its events as lost."""
        self._fail_group(group, error)
        self._count_lost(group.rows)

    def _count_lost(self, rows: list[Row]) -> None:
        for row in rows:
            if not is_admission(row[_TYPE], row[_OUTCOME]):  # an admission's refusal is logged
                self._lost_total += self._lost.add(row)

    # -- shipping ----------------------------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        conn = await shipping.connect(
            self._url, connect_timeout=self._connect_timeout, command_timeout=self._command_timeout
        )
        self._next_partition_check = time.monotonic() + _PARTITION_CHECK_EVERY
        return conn

    async def _ensure_partitions(self, conn: asyncpg.Connection) -> None:
        await shipping.ensure_partitions(conn)
        self._next_partition_check = time.monotonic() + _PARTITION_CHECK_EVERY

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _connected(self) -> asyncpg.Connection:
        """The shipping connection, (re)made and the chain claimed on it.

        Raises:
            ChainTaken: another process writes this chain (fatal for the sink).
        """
        if self._conn is None:
            conn = await self._connect()
            try:
                await self._claim(conn)
            except BaseException:
                conn.terminate()
                raise
            self._conn = conn
        return self._conn

    async def _checkpoint(self) -> None:
        """Sign the committed head (see `gateway.events.checkpoints`)."""
        clock = self._clock
        assert clock is not None and clock.committed is not None
        head = clock.committed
        try:
            conn = await self._connected()
            await write_checkpoint(
                conn, clock.policy.signer, chain_id=self._chain_id, head=head,
                file=clock.policy.file,
            )  # fmt: skip
        except DB_ERRORS as exc:
            log.warning("audit checkpoint of %s failed (retrying): %s", self._chain_id, exc)
            await self._drop_connection()
            clock.failed()
            return
        clock.done(head)

    async def _idle(self) -> None:
        """Wait for events to ship, signing a checkpoint when one falls due meanwhile."""
        due = self._clock.due() if self._clock is not None else None
        if due is None:
            await self._ship_wake.wait()
        elif due <= 0:
            await self._checkpoint()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ship_wake.wait(), due)

    async def _ship_loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = _RETRY_MIN
        while True:
            if not self._durable:
                if not self._unwritten:
                    self._drained.set()
                self._ship_wake.clear()
                await self._idle()
                continue
            if len(self._durable) < self._batch_size and not self._closing:
                await asyncio.sleep(self._ship_interval)
            batch = list(islice(self._durable, self._batch_size))
            try:
                if self._conn is None:
                    await self._connected()
                elif time.monotonic() >= self._next_partition_check:
                    await self._ensure_partitions(self._conn)
                assert self._conn is not None
                await self._ship(self._conn, batch)
            except DB_ERRORS as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # close() cancelled us mid-batch and asyncpg's failed ROLLBACK replaced
                    # the CancelledError: honour the cancellation (the spool keeps the batch).
                    raise asyncio.CancelledError from exc
                self._ship_failures += 1
                log.warning(
                    "shipping %d events failed (retry in %.2fs): %s", len(batch), delay, exc
                )
                await self._drop_connection()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            delay = _RETRY_MIN
            await loop.run_in_executor(self._io, self._spool.release, batch[-1][_SEQ])
            for _ in batch:
                self._durable.popleft()
            if self._clock is not None:
                self._clock.shipped(batch[-1][_SEQ], batch[-1][_HASH])
                due = self._clock.due()
                if due is not None and due <= 0:
                    await self._checkpoint()
            if self._lost.count and self._failed is None and not self._closing:
                self._record_loss()  # shipping made room: record what was lost meanwhile

    async def _ship(self, conn: asyncpg.Connection, batch: Sequence[Row]) -> None:
        started = time.monotonic()
        first, last = batch[0][_SEQ], batch[-1][_SEQ]
        try:
            await shipping.copy_batch(
                conn, batch, chain_id=self._chain_id, replay=first <= self._uncertain_seq
            )
        except BaseException:
            # The commit may have happened (lost reply) or a unique violation says an attempt
            # we lost track of stored it: retry through the staging table.
            self._uncertain_seq = max(self._uncertain_seq, last)
            raise
        self._shipped += len(batch)
        self._batches += 1
        self._last_batch_size = len(batch)
        self._last_ship_latency = time.monotonic() - started
        if self._metrics is not None:
            self._metrics.shipped(len(batch))

    # -- metrics -----------------------------------------------------------------------

    @property
    def chain_id(self) -> str:
        """The chain this sink appends to (``<chain_id>#<uuid7>`` after a blind start)."""
        return self._chain_id

    @property
    def stats(self) -> SinkStats:
        """A snapshot for metrics."""
        return SinkStats(
            chain_id=self._chain_id,
            head_seq=self._head_seq,
            queue_depth=len(self._durable) + sum(len(group.rows) for group in self._unwritten),
            spool_bytes=self._spool.bytes,
            spool_segments=len(self._spool.segments),
            events_recorded=self._recorded,
            events_shipped=self._shipped,
            fsyncs=self._fsyncs,
            batches=self._batches,
            ship_failures=self._ship_failures,
            last_batch_size=self._last_batch_size,
            last_flush_latency=self._last_flush_latency,
            last_ship_latency=self._last_ship_latency,
            database_connected=self._conn is not None,
            full=self._refuses(self._last_frame, True),
            events_lost=self._lost.count,
            events_lost_total=self._lost_total,
            events_missing_total=self._missing_total,
        )


def _log_failure(future: concurrent.futures.Future[None]) -> None:
    exc = future.exception()
    if isinstance(exc, SpoolFull):  # admissions stop until a spare can be made again
        log.warning("spool disk full: %s", exc)
    elif exc is not None:  # rotation falls back to creating the segment itself
        log.warning("preparing a spare spool segment failed: %s", exc)


def _fail(future: asyncio.Future[None] | None, error: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(error)
        future.exception()  # retrieved: nobody may be waiting on it


def _loss_recorded(count: int, future: asyncio.Future[None]) -> None:
    # Nobody awaits this future; when it fails, `SpoolSink._lose` re-counted the loss.
    if not future.cancelled() and future.exception() is None:
        log.warning("recorded the loss of %d events (the spool was full)", count)


def _missing_event(name: str, chain_id: str, first: int, last: int) -> AuthEvent:
    """The event that records seqs the database lacks although they were shipped."""
    return AuthEvent(
        instance=name.rpartition("/")[0] or name,
        type=EventType.EVENTS_MISSING,
        outcome=Outcome.DENIED,
        reason=Reason.DATABASE_BEHIND_SPOOL,
        detail={
            "chain_id": chain_id,
            "first_seq": first,
            "last_seq": last,
            "count": last - first + 1,
        },
    )
