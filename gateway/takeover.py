"""Takeover across workers and instances: one live session per (device, client id) fleet-wide.

Within one worker `gateway.sessions.SessionRegistry` decides. Across workers and gateway
instances, which share nothing but PostgreSQL, the `SessionBus` does: a worker that is
about to admit a session announces it with ``pg_notify`` on `SESSIONS_CHANNEL` (a
`SessionNotice`), and every worker listening ends its own older session of that pair.

Invariants:

* "Older" is PostgreSQL's delivery order, the same for every listener: a notice ends a
  local session only if that session's own announcement has already come back
  (`Claim.seen`). Two sessions racing on two instances therefore agree on the winner (the
  one announced last), and neither ends the other twice.
* A session waits for its own announcement to come back (bounded by ``wait``) before its
  CONNECT is sent to the broker: by then the other listeners have it too, so the old
  session is usually ended by its gateway (DISCONNECT 0x8E, ``session_taken_over`` with
  the new session's instance and worker) before the broker's own takeover. A claim whose
  announcement did not come back in time counts as seen anyway; after a failed send no
  claim waits (until a send works again), so an outage does not slow every CONNECT.
* When the broker wins that race (it closes the old upstream first), the old session is
  held for ``grace`` seconds (device reads paused) before it ends ``upstream_closed``: a
  notice arriving meanwhile ends it as ``session_taken_over`` instead.
* Best effort by design: notices are hints, not state. While PostgreSQL is unreachable
  nothing is announced or heard; the broker's own client-id takeover still ends the old
  session (recorded ``upstream_closed``). Announcements are batched: one round trip carries
  every session claimed meanwhile, in claim order. While CONNECTs arrive close together
  (the last send began less than ``_BUSY`` ago), the first claim of a batch also waits
  ``coalesce`` (3 ms) for others to join it: under load that makes a few ``pg_notify``
  transactions out of many (each one wakes PostgreSQL and every listening worker). A
  lone CONNECT on a quiet bus is sent at once.
* Listening reuses the revocation cache's LISTEN connection
  (`gateway.revocation_listen.RevocationCache.also_listen`); sending uses one connection of its
  own (no pool: an acquire and release cost more CPU than the ``pg_notify`` itself), opened
  on the first send and dropped on any error, so the next send opens a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

import asyncpg
from pydantic import ValidationError

from gateway.database import DB_ERRORS, close_quietly
from schemas.notify import SESSIONS_CHANNEL, SessionNotice

__all__ = ["Claim", "SessionBus", "TakeoverListener"]

log = logging.getLogger("devicegate.gateway.takeover")

_BUSY: Final = 0.05
"""Seconds: a send begun this recently means CONNECTs are arriving close together."""
_NOTIFY: Final = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload"


_ids: tuple[int, str, itertools.count[int]] | None = None  # (pid, prefix, counter)


def _new_session_id() -> str:
    """A session id unique across workers and instances: 64 random bits drawn once per
    process, then a counter (no getrandom call per CONNECT)."""
    global _ids
    pid = os.getpid()
    if _ids is None or _ids[0] != pid:  # first use, or a forked child: a fresh prefix
        _ids = (pid, secrets.token_hex(8), itertools.count())
    return f"{_ids[1]}{next(_ids[2]):016x}"


@dataclass(slots=True, eq=False)
class Claim:
    """One session's claim on ``(device_id, client_id)``."""

    device_id: str
    client_id: str | None
    session_id: str = field(default_factory=_new_session_id)
    seen: bool = False
    """Its announcement came back (or timed out): notices heard from now on are newer."""
    back: asyncio.Future[bool] | None = None
    """While `SessionBus.announce` waits: True when the announcement comes back."""


class TakeoverListener(Protocol):
    """The gateway, as the bus sees it."""

    def taken_over(self, notice: SessionNotice) -> int:
        """End the local session(s) older than ``notice``; how many."""
        ...


class Channels(Protocol):
    """Something that already LISTENs and can listen to one more channel."""

    def also_listen(self, channel: str, callback: Callable[[str], None]) -> None: ...


class SessionBus:
    """Announces the sessions a worker admits and ends its own older ones.

    Args:
        database_url: PostgreSQL, for sending (one connection, opened when first needed).
        instance: This gateway instance (``Settings.instance_id``).
        worker: This worker's name (``w<i>``).
        wait: How long a new session waits for its announcement to come back.
        grace: How long a session whose upstream the broker closed waits for a notice
            that explains it (the broker's own takeover may beat the notice).
        timeout: Limit for connecting and for each send.
        coalesce: How long the first claim of a batch waits for more to join it, while the
            bus is busy (see the module invariants).
    """

    def __init__(
        self,
        *,
        database_url: str,
        instance: str,
        worker: str,
        wait: float = 0.5,
        grace: float = 0.3,
        timeout: float = 5.0,
        coalesce: float = 0.003,
    ) -> None:
        self.database_url = database_url
        self.instance = instance
        self.worker = worker
        self.wait = wait
        self.grace = grace
        self.timeout = timeout
        self.coalesce = coalesce
        self._mine: dict[str, Claim] = {}  # session id -> claim, until it comes back
        self._queue: list[str] = []
        self._pending = asyncio.Event()
        self._listeners: list[TakeoverListener] = []
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self.announced = 0
        self.round_trips = 0  # pg_notify transactions sent (each carries a batch)
        self._last_send = float("-inf")  # loop time the last send began
        self.heard = 0
        self.taken_over = 0
        self.send_failures = 0
        self._healthy = True  # the last send worked: worth waiting for the echo

    def listen_on(self, channels: Channels) -> None:
        """Hear the notices on ``channels``' LISTEN connection (call before it starts)."""
        channels.also_listen(SESSIONS_CHANNEL, self._on_notice)

    async def start(self) -> None:
        if self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._send_forever(), name="announce")

    async def close(self) -> None:
        task, self._task = self._task, None
        conn, self._conn = self._conn, None
        await close_quietly(task, conn, grace=self.timeout)

    def attach(self, listener: TakeoverListener) -> None:
        self._listeners.append(listener)

    def detach(self, listener: TakeoverListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    # --- announcing --------------------------------------------------------------------

    async def announce(self, claim: Claim) -> bool:
        """Announce ``claim``; wait (up to ``wait``) until it comes back. Whether it did."""
        if self._task is None:
            claim.seen = True
            return False
        notice = SessionNotice(
            device_id=claim.device_id,
            client_id=claim.client_id,
            instance=self.instance,
            worker=self.worker,
            session_id=claim.session_id,
        )
        self._mine[claim.session_id] = claim
        self._queue.append(notice.model_dump_json())
        self._pending.set()
        if not self._healthy:  # PostgreSQL is away: do not make every CONNECT wait
            self._mine.pop(claim.session_id, None)
            claim.seen = True
            return False
        # A future and a timer rather than an Event under asyncio.timeout: the same wait,
        # at a fraction of the cost (this runs once per CONNECT).
        loop = asyncio.get_running_loop()
        back: asyncio.Future[bool] = loop.create_future()
        claim.back = back
        timer = loop.call_later(self.wait, _give_up, back)
        try:
            came_back = await back
        finally:
            timer.cancel()
            claim.back = None  # not kept for the session's life
        if not came_back:
            self._mine.pop(claim.session_id, None)
            claim.seen = True
        return came_back

    def release(self, claim: Claim) -> None:
        """The session closed: stop waiting for its announcement."""
        self._mine.pop(claim.session_id, None)

    async def _send_forever(self) -> None:
        while True:
            await self._pending.wait()
            loop = asyncio.get_running_loop()
            if self.coalesce > 0 and loop.time() - self._last_send < _BUSY:
                await asyncio.sleep(self.coalesce)  # more claims join this round trip
            self._last_send = loop.time()
            self._pending.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            try:
                async with asyncio.timeout(self.timeout):
                    conn = self._conn
                    if conn is None or conn.is_closed():
                        self._conn = None
                        conn = self._conn = await asyncpg.connect(self.database_url)
                    await conn.execute(_NOTIFY, SESSIONS_CHANNEL, batch)
                self.announced += len(batch)
                self.round_trips += 1
                self._healthy = True
            except DB_ERRORS as exc:
                self.send_failures += 1
                self._healthy = False
                self._drop_connection()
                log.warning("could not announce %d session(s): %s", len(batch), exc)

    def _drop_connection(self) -> None:
        """Forget the sending connection after an error (its state is unknown)."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    # --- hearing -----------------------------------------------------------------------

    def _on_notice(self, payload: str) -> None:
        self.heard += 1
        try:
            notice = SessionNotice.model_validate_json(payload)
        except ValidationError:
            log.warning("unreadable session notice %r", payload[:200])
            return
        mine = self._mine.pop(notice.session_id, None)
        if mine is not None:
            mine.seen = True
            if mine.back is not None and not mine.back.done():
                mine.back.set_result(True)
            return
        for listener in list(self._listeners):
            try:
                self.taken_over += listener.taken_over(notice)
            except Exception:
                log.exception("takeover listener failed")


def _give_up(back: asyncio.Future[bool]) -> None:
    """The announcement did not come back in time."""
    if not back.done():
        back.set_result(False)
