"""`RevocationCache`: the `DeviceDirectory` kept current by LISTEN/NOTIFY.

Invariants:

* It looks up what `DeviceStates` cannot tell, and keeps the rows current from the
  ``NOTIFY`` that provisioning sends on `REVOCATION_CHANNEL` in the same transaction as
  every revoke, disable, enable and supersede.
* The cache is *current as of* the moment ``LISTEN`` was last known to be working: the
  start of the reload that followed (re)connecting, then the sending time of each
  heartbeat query that came back on the listening connection (a notification committed
  before that query is delivered before its reply). ``state_age`` is the time since then.
  Past ``stale_after`` every check answers ``revocation_state_stale`` without touching
  PostgreSQL (fail closed, and cheap while PostgreSQL is away); sessions already admitted
  continue (they were authorised by current state, and cutting every session of every
  gateway whenever PostgreSQL blips would turn a database outage into a fleet outage).
* After every (re)connection the cache reloads every row it holds, plus those of the live
  sessions, in one snapshot, *after* ``LISTEN`` is in place, and only then counts as
  current: notifications missed during an outage are made up for. Live sessions whose
  device or certificate changed meanwhile are then cut, exactly as a notification would
  have cut them.
* Every notification is applied to the cache first, then handed to the attached
  listeners (the gateway), which cut the live sessions it concerns (`cut_reason`). An
  unreadable notification forgets nothing silently: it triggers a full reload.
* A lookup racing a notification is retried: its result is cached only if no
  notification arrived while it ran, so an old row never overwrites a newer state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Final

import asyncpg
from pydantic import ValidationError

from gateway.database import DB_ERRORS, close_quietly, keep_session
from gateway.device_lookup import BATCH_LOOKUP, LookupBatcher, Row
from gateway.identity import DeviceIdentity
from gateway.revocation import DeviceStates, RevocationListener, cut_reason, verdict
from schemas.events import Reason
from schemas.notify import REVOCATION_CHANNEL, RevocationNotice

__all__ = ["RevocationCache"]

log = logging.getLogger("devicegate.gateway.revocation")

_RELOAD_DEVICES: Final = (
    "SELECT device_id, status, fleet FROM devices WHERE device_id = ANY($1::text[])"
)
_RELOAD_CERTIFICATES: Final = (
    "SELECT serial, device_id, status FROM certificates WHERE serial = ANY($1::text[])"
)
_RELOAD_CHUNK: Final = 10_000
_LOOKUP_TRIES: Final = 3
_WARN_EVERY: Final = 10.0


class RevocationCache:
    """`DeviceDirectory` kept current by LISTEN/NOTIFY (see the module invariants).

    Use as ``async with RevocationCache(database_url=...) as directory:``; a `Gateway`
    given it attaches itself, so notifications cut its live sessions.

    Args:
        database_url: PostgreSQL; one dedicated connection listens, a small pool looks up.
        stale_after: Refuse new connections when the state is older than this (seconds).
        heartbeat: Seconds between liveness queries on the listening connection (default
            a quarter of ``stale_after``, at most 5 s).
        max_devices: Devices kept in the cache (least recently used are dropped).
        retry_min: First reconnection delay; doubles up to ``retry_max`` (with jitter).
        retry_max: Longest reconnection delay.
        timeout: Limit for connecting and for each query.
        clock: Monotonic clock (tests).
    """

    def __init__(
        self,
        *,
        database_url: str,
        stale_after: float = 30.0,
        heartbeat: float | None = None,
        max_devices: int = 100_000,
        retry_min: float = 0.1,
        retry_max: float = 5.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.database_url = database_url
        self.stale_after = stale_after
        self.heartbeat = heartbeat if heartbeat is not None else min(5.0, stale_after / 4)
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.timeout = timeout
        self._clock = clock
        self._states = DeviceStates(max_devices)
        self._listeners: list[RevocationListener] = []
        self._channels: dict[str, Callable[[str], None]] = {}  # more channels, same LISTEN
        self._current_at: float | None = None
        self._epoch = 0  # bumped by every notification and reload
        self._deferred: list[RevocationNotice] | None = None  # notices seen during a reload
        self._wake = asyncio.Event()  # the listening connection is lost, or a reload is due
        self._resync = False  # a full reload is due (an unreadable notice)
        self._became_current = asyncio.Event()
        self._pool: asyncpg.Pool | None = None
        self._lookups = LookupBatcher(self._fetch_rows)
        self._task: asyncio.Task[None] | None = None
        self.notifications = 0
        self.reloads = 0
        self.hits = 0
        self.misses = 0
        self.lookup_failures = 0
        self._warned_at = -_WARN_EVERY

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening in the background (returns at once; see `wait_current`)."""
        if self._task is not None:
            return
        self._pool = await asyncpg.create_pool(
            self.database_url, min_size=0, max_size=4, timeout=self.timeout, reset=keep_session
        )
        self._task = asyncio.get_running_loop().create_task(
            self._listen_forever(), name="revocation-listen"
        )

    async def wait_current(self, within: float) -> bool:
        """Wait until the state is current for the first time; False after ``within`` s."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._became_current.wait()
        return self._became_current.is_set()

    async def close(self) -> None:
        await self._lookups.close()
        task, self._task = self._task, None
        pool, self._pool = self._pool, None
        await close_quietly(task, pool, grace=self.timeout)

    async def __aenter__(self) -> RevocationCache:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def attach(self, listener: RevocationListener) -> None:
        """Report changes to ``listener`` (see `RevocationListener`)."""
        self._listeners.append(listener)

    def detach(self, listener: RevocationListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def also_listen(self, channel: str, callback: Callable[[str], None]) -> None:
        """Hand each payload on ``channel`` to ``callback`` too, on the same connection.

        Call before `start`. The channel is listened to from every (re)connection on;
        notices sent while the connection is down are not replayed (unlike revocations,
        whose state is reloaded): ``channel`` must carry hints, not state.
        """
        self._channels[channel] = callback

    def _on_other(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        callback = self._channels.get(channel)
        if callback is None:
            return
        try:
            callback(payload)
        except Exception:  # a broken side channel must not stop revocations
            log.exception("listener of %s failed", channel)

    # --- state -------------------------------------------------------------------------

    def state_age(self) -> float | None:
        """Seconds since the state was last known current (None: never yet)."""
        if self._current_at is None:
            return None
        return max(0.0, self._clock() - self._current_at)

    def stale(self) -> bool:
        """Whether new connections are refused (``revocation_state_stale``)."""
        age = self.state_age()
        return age is None or age > self.stale_after

    @property
    def max_devices(self) -> int:
        return self._states.max_devices

    @property
    def cached_devices(self) -> int:
        """How many devices the cache holds."""
        return self._states.count

    def _mark_current(self, as_of: float) -> None:
        if self._current_at is None or as_of > self._current_at:
            if self._current_at is not None and self._clock() - self._current_at > self.stale_after:
                log.warning("revocation state is current again")
            self._current_at = as_of
        self._became_current.set()

    # --- DeviceDirectory ---------------------------------------------------------------

    async def check(self, *, device_id: str, fleet: str, serial: str) -> Reason:
        """See `DeviceDirectory.check`; ``revocation_state_stale`` when the state is too old
        or a needed lookup fails."""
        if self.stale():
            return Reason.REVOCATION_STATE_STALE
        known = self._states.judge(device_id=device_id, fleet=fleet, serial=serial)
        if known is not None:
            self.hits += 1
            return known
        self.misses += 1
        try:
            return await self._lookup(device_id, fleet, serial)
        except DB_ERRORS as exc:
            self.lookup_failures += 1
            now = self._clock()
            if now - self._warned_at >= _WARN_EVERY:  # an outage must not flood the log
                self._warned_at = now
                log.warning(
                    "device lookup failed (%d so far), refusing %s: %s",
                    self.lookup_failures,
                    device_id,
                    exc,
                )
            return Reason.REVOCATION_STATE_STALE

    async def _fetch_rows(self, device_ids: list[str], serials: list[str]) -> list[Row]:
        pool = self._pool
        if pool is None:
            raise asyncpg.InterfaceError("the revocation cache is not started")
        async with asyncio.timeout(self.timeout):
            rows: list[Row] = await pool.fetch(BATCH_LOOKUP, device_ids, serials)
        return rows

    async def _lookup(self, device_id: str, fleet: str, serial: str) -> Reason:
        row = None
        cacheable = False
        for _ in range(_LOOKUP_TRIES):
            epoch = self._epoch
            row = await self._lookups.lookup(device_id, serial)
            if self._epoch == epoch:
                cacheable = True
                break
        if row is None:
            return Reason.DEVICE_UNKNOWN  # not cached: it may be enrolled any moment
        if cacheable:
            self._states.store(
                device_id,
                status=row["device_status"],
                fleet=row["fleet"],
                serial=serial,
                cert_owner=row["cert_device"],
                cert_status=row["cert_status"],
            )
        return verdict(
            fleet=fleet,
            device_status=row["device_status"],
            device_fleet=row["fleet"],
            cert_status=row["cert_status"],
            cert_device=row["cert_device"],
            device_id=device_id,
        )

    # --- notifications -----------------------------------------------------------------

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._epoch += 1
        self.notifications += 1
        try:
            notice = RevocationNotice.model_validate_json(payload)
        except ValidationError as exc:
            log.error("unreadable revocation notice %r (%s); reloading", payload[:200], exc)
            self._resync = True
            self._wake.set()
            return
        if self._deferred is not None:
            self._deferred.append(notice)
        self._states.apply(notice)
        reason = cut_reason(notice)
        if reason is None:
            return
        serial = notice.serial if notice.kind == "certificate" else None
        for listener in list(self._listeners):
            try:
                cut = listener.revoke(notice.device_id, reason=reason, serial=serial)
            except Exception:  # one broken listener must not stop the others
                log.exception("revocation listener failed")
                continue
            if cut:
                log.info("cut %d session(s) of %s: %s", cut, notice.device_id, reason)

    # --- the listening connection ------------------------------------------------------

    async def _listen_forever(self) -> None:
        delay = self.retry_min
        while True:
            connection: asyncpg.Connection | None = None
            try:
                connection = await asyncpg.connect(self.database_url, timeout=self.timeout)
                await self._listen(connection)
                delay = self.retry_min  # it worked for a while: start backing off afresh
            except Exception as exc:  # never give up: reconnect, whatever failed
                log.warning(
                    "revocation listener: %s: %s (retrying in %.1f s, state age %s)",
                    type(exc).__name__,
                    exc,
                    delay,
                    _age(self.state_age()),
                )
            finally:
                self._deferred = None
                if connection is not None:
                    connection.terminate()
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
            delay = min(delay * 2, self.retry_max)

    async def _listen(self, connection: asyncpg.Connection) -> None:
        """LISTEN, reload, then heartbeat until the connection fails (returns) or a query
        on it fails (raises)."""
        lost = False

        def terminated(_connection: object) -> None:
            nonlocal lost
            lost = True
            self._wake.set()

        self._wake.clear()
        self._resync = False
        connection.add_termination_listener(terminated)
        await connection.add_listener(REVOCATION_CHANNEL, self._on_notify)
        for channel in self._channels:
            await connection.add_listener(channel, self._on_other)
        while not lost:
            self._resync = False
            as_of = self._clock()
            await self._reload(connection)
            self._mark_current(as_of)
            while not (lost or self._resync):
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.heartbeat):
                        await self._wake.wait()
                if lost or self._resync:
                    break
                sent = self._clock()
                async with asyncio.timeout(self.timeout):
                    await connection.fetchval("SELECT 1")
                self._mark_current(sent)

    async def _reload(self, connection: asyncpg.Connection) -> None:
        """Re-read every cached and live row in one snapshot; cut what changed."""
        live = [identity for listener in self._listeners for identity in listener.live_identities()]
        device_ids, serials = self._states.held()
        device_ids |= {identity.device_id for identity in live}
        serials |= {identity.serial for identity in live}
        self._deferred = []
        self._epoch += 1
        devices: list[asyncpg.Record] = []
        certificates: list[asyncpg.Record] = []
        async with asyncio.timeout(self.timeout + len(device_ids) / 10_000):
            async with connection.transaction(isolation="repeatable_read", readonly=True):
                for chunk in _chunks(sorted(device_ids)):
                    devices.extend(await connection.fetch(_RELOAD_DEVICES, chunk))
                for chunk in _chunks(sorted(serials)):
                    certificates.extend(await connection.fetch(_RELOAD_CERTIFICATES, chunk))
        deferred, self._deferred = self._deferred, None
        self._states.rebuild(devices, certificates, deferred or ())
        self.reloads += 1
        self._reverify(live)

    def _reverify(self, live: list[DeviceIdentity]) -> None:
        for identity in live:
            reason = self._states.reverify(identity)
            if reason is Reason.OK:
                continue
            log.warning("after reload: %s is %s; cutting its session", identity.device_id, reason)
            for listener in list(self._listeners):
                try:
                    listener.revoke(identity.device_id, reason=reason, serial=identity.serial)
                except Exception:
                    log.exception("revocation listener failed")


def _chunks(values: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(values), _RELOAD_CHUNK):
        yield values[start : start + _RELOAD_CHUNK]


def _age(age: float | None) -> str:
    return "never current" if age is None else f"{age:.1f} s"
