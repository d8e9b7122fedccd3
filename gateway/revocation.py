"""Is this device, with this certificate, allowed in right now, and is it still?

Invariants:

* One small interface, `DeviceDirectory`, answers per CONNECT with a `Reason`:
  ``OK`` or why not. The bridge never queries the registry any other way.
* Fail closed: a certificate not in the registry, registered to another device, or an
  unknown device is refused; a lookup that fails raises (or answers
  ``revocation_state_stale``), and the caller refuses.
* `RevocationCache` is the production directory. It caches, per device, the registry rows
  it has looked up (device status and fleet; status and owner of each certificate the
  device presented), LRU-bounded, and keeps them current from the ``NOTIFY`` that
  provisioning sends on `REVOCATION_CHANNEL` in the same transaction as every revoke,
  disable, enable and supersede. Rows that appear without a notification (a new device,
  a renewed certificate) are simply not cached yet: unknown keys are always looked up,
  never answered from a negative cache.
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
  listeners (the gateway), which cut the live sessions it concerns: device ``disabled`` /
  ``revoked`` cut all of the device's sessions; certificate ``revoked`` / ``superseded``
  the sessions on that certificate; device ``active`` (enabled) cuts nothing. An
  unreadable notification forgets nothing silently: it triggers a full reload.
* Superseded (renewed) certificates are cut too: zero trust means a session lives only
  as long as its credential would be admitted now, and a superseded certificate is not.
  A renewing device reconnects with its new certificate anyway (it has to, to use it);
  it sees DISCONNECT 0x98 on MQTT 5, and its reconnection is an ordinary CONNECT.
* A lookup racing a notification is retried: its result is cached only if no
  notification arrived while it ran, so an old row never overwrites a newer state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Protocol, runtime_checkable

import asyncpg
from pydantic import ValidationError

from gateway.database import DB_ERRORS, close_quietly, keep_session
from gateway.identity import DeviceIdentity
from schemas.events import Reason
from schemas.notify import REVOCATION_CHANNEL, RevocationNotice

__all__ = [
    "DeviceDirectory",
    "LiveDirectory",
    "PostgresDirectory",
    "RevocationCache",
    "RevocationListener",
    "cut_reason",
    "verdict",
]

log = logging.getLogger("devicegate.gateway.revocation")

_QUERY: Final = """
SELECT d.status AS device_status, d.fleet, c.status AS cert_status, c.device_id AS cert_device
FROM devices d LEFT JOIN certificates c ON c.serial = $2
WHERE d.device_id = $1
"""
_RELOAD_DEVICES: Final = (
    "SELECT device_id, status, fleet FROM devices WHERE device_id = ANY($1::text[])"
)
_RELOAD_CERTIFICATES: Final = (
    "SELECT serial, device_id, status FROM certificates WHERE serial = ANY($1::text[])"
)
_RELOAD_CHUNK: Final = 10_000

_DEVICE_STATUS: Final = {
    "active": Reason.OK,
    "disabled": Reason.DEVICE_DISABLED,
    "revoked": Reason.DEVICE_REVOKED,
}
_CERT_STATUS: Final = {
    "active": Reason.OK,
    "revoked": Reason.CERTIFICATE_REVOKED,
    "superseded": Reason.CERTIFICATE_SUPERSEDED,
}
_CUTS: Final = {
    ("device", "disabled"): Reason.DEVICE_DISABLED,
    ("device", "revoked"): Reason.DEVICE_REVOKED,
    ("certificate", "revoked"): Reason.CERTIFICATE_REVOKED,
    ("certificate", "superseded"): Reason.CERTIFICATE_SUPERSEDED,
}
_CERTS_PER_DEVICE: Final = 8
_LOOKUP_TRIES: Final = 3
_WARN_EVERY: Final = 10.0


class DeviceDirectory(Protocol):
    """The registry as the gateway sees it."""

    async def check(self, *, device_id: str, fleet: str, serial: str) -> Reason:
        """``Reason.OK`` if the device and certificate may connect, else the refusal reason.

        Raises:
            Exception: the state is unavailable; the caller must refuse (fail closed).
        """
        ...


class RevocationListener(Protocol):
    """What a live directory tells (the gateway): which sessions to cut."""

    def revoke(self, device_id: str, *, reason: Reason, serial: str | None = None) -> int:
        """Cut the sessions of ``device_id`` (only those on ``serial`` if given)."""
        ...

    def live_identities(self) -> Iterable[DeviceIdentity]:
        """The identities of the sessions open now (reverified after a reload)."""
        ...


@runtime_checkable
class LiveDirectory(Protocol):
    """A directory that also reports changes for live sessions (`RevocationCache`)."""

    def attach(self, listener: RevocationListener) -> None: ...

    def detach(self, listener: RevocationListener) -> None: ...


def verdict(
    *,
    fleet: str,
    device_status: str | None,
    device_fleet: str | None,
    cert_status: str | None,
    cert_device: str | None,
    device_id: str,
) -> Reason:
    """The decision from registry rows (shared by the direct lookup and the cache)."""
    if device_status is None:
        return Reason.DEVICE_UNKNOWN
    device_reason = _DEVICE_STATUS.get(device_status, Reason.DEVICE_DISABLED)
    if device_reason is not Reason.OK:
        return device_reason
    if cert_status is None or cert_device != device_id or device_fleet != fleet:
        return Reason.CERTIFICATE_INVALID  # not ours to vouch for: not registered to it
    return _CERT_STATUS.get(cert_status, Reason.CERTIFICATE_REVOKED)


def cut_reason(notice: RevocationNotice) -> Reason | None:
    """Why live sessions end on ``notice`` (None: nothing to cut, e.g. a device enabled)."""
    return _CUTS.get((notice.kind, notice.status))


class PostgresDirectory:
    """Looks each CONNECT up in the ``devices`` and ``certificates`` tables."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def check(self, *, device_id: str, fleet: str, serial: str) -> Reason:
        """See `DeviceDirectory.check`."""
        row = await self._pool.fetchrow(_QUERY, device_id, serial)
        if row is None:
            return Reason.DEVICE_UNKNOWN
        return verdict(
            fleet=fleet,
            device_status=row["device_status"],
            device_fleet=row["fleet"],
            cert_status=row["cert_status"],
            cert_device=row["cert_device"],
            device_id=device_id,
        )


@dataclass(slots=True)
class _Device:
    status: str
    fleet: str
    certs: dict[str, tuple[str, str]] = field(default_factory=dict)  # serial: (owner, status)

    def judge(self, *, device_id: str, fleet: str, serial: str) -> Reason | None:
        """The verdict, or None when this entry cannot tell (certificate not cached)."""
        cert = self.certs.get(serial)
        if cert is None and self.status == "active":
            return None
        owner, status = cert if cert is not None else (None, None)
        return verdict(
            fleet=fleet,
            device_status=self.status,
            device_fleet=self.fleet,
            cert_status=status,
            cert_device=owner,
            device_id=device_id,
        )


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
        self.max_devices = max_devices
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.timeout = timeout
        self._clock = clock
        self._devices: OrderedDict[str, _Device] = OrderedDict()
        self._listeners: list[RevocationListener] = []
        self._channels: dict[str, Callable[[str], None]] = {}  # more channels, same LISTEN
        self._current_at: float | None = None
        self._epoch = 0  # bumped by every notification and reload
        self._deferred: list[RevocationNotice] | None = None  # notices seen during a reload
        self._wake = asyncio.Event()  # the listening connection is lost, or a reload is due
        self._resync = False  # a full reload is due (an unreadable notice)
        self._became_current = asyncio.Event()
        self._pool: asyncpg.Pool | None = None
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
    def cached_devices(self) -> int:
        """How many devices the cache holds (no ``__len__``: an empty cache is not falsy)."""
        return len(self._devices)

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
        entry = self._devices.get(device_id)
        if entry is not None:
            known = entry.judge(device_id=device_id, fleet=fleet, serial=serial)
            if known is not None:
                self._devices.move_to_end(device_id)
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

    async def _lookup(self, device_id: str, fleet: str, serial: str) -> Reason:
        pool = self._pool
        if pool is None:
            raise asyncpg.InterfaceError("the revocation cache is not started")
        row = None
        cacheable = False
        for _ in range(_LOOKUP_TRIES):
            epoch = self._epoch
            async with asyncio.timeout(self.timeout):
                row = await pool.fetchrow(_QUERY, device_id, serial)
            if self._epoch == epoch:
                cacheable = True
                break
        if row is None:
            return Reason.DEVICE_UNKNOWN  # not cached: it may be enrolled any moment
        if cacheable:
            entry = self._devices.get(device_id)
            if entry is None:
                entry = self._devices[device_id] = _Device(row["device_status"], row["fleet"])
            else:
                entry.status, entry.fleet = row["device_status"], row["fleet"]
            if row["cert_status"] is not None:
                self._remember(entry, serial, row["cert_device"], row["cert_status"])
            self._devices.move_to_end(device_id)
            while len(self._devices) > self.max_devices:
                self._devices.popitem(last=False)
        return verdict(
            fleet=fleet,
            device_status=row["device_status"],
            device_fleet=row["fleet"],
            cert_status=row["cert_status"],
            cert_device=row["cert_device"],
            device_id=device_id,
        )

    @staticmethod
    def _remember(entry: _Device, serial: str, owner: str, status: str) -> None:
        entry.certs.pop(serial, None)
        entry.certs[serial] = (owner, status)
        while len(entry.certs) > _CERTS_PER_DEVICE:
            del entry.certs[next(iter(entry.certs))]

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
        self._apply(notice)
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

    def _apply(self, notice: RevocationNotice) -> None:
        entry = self._devices.get(notice.device_id)
        if entry is None:
            return
        if notice.kind == "device":
            if notice.status in _DEVICE_STATUS:
                entry.status = notice.status
            else:
                del self._devices[notice.device_id]  # nonsense for a device: forget it
        elif notice.serial is not None and notice.serial in entry.certs:
            owner, _ = entry.certs[notice.serial]
            entry.certs[notice.serial] = (owner, notice.status)

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
        device_ids = set(self._devices) | {identity.device_id for identity in live}
        serials = {serial for entry in self._devices.values() for serial in entry.certs}
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
        # Rebuild in the old LRU order (new live devices last), then replay notices that
        # arrived meanwhile (they may be newer than the snapshot; replaying is idempotent).
        order = {device_id: i for i, device_id in enumerate(self._devices)}
        rebuilt: OrderedDict[str, _Device] = OrderedDict()
        for row in sorted(devices, key=lambda r: order.get(r["device_id"], len(order))):
            rebuilt[row["device_id"]] = _Device(row["status"], row["fleet"])
        for row in certificates:  # kept under the owner only: elsewhere it is invalid anyway
            entry = rebuilt.get(row["device_id"])
            if entry is not None:
                self._remember(entry, row["serial"], row["device_id"], row["status"])
        self._devices = rebuilt
        deferred, self._deferred = self._deferred, None
        for notice in deferred or ():
            self._apply(notice)
        while len(self._devices) > self.max_devices:
            self._devices.popitem(last=False)
        self.reloads += 1
        self._reverify(live)

    def _reverify(self, live: list[DeviceIdentity]) -> None:
        for identity in live:
            entry = self._devices.get(identity.device_id)
            reason = Reason.DEVICE_UNKNOWN
            if entry is not None:
                # Every live serial was just read: not cached means not in the registry.
                reason = (
                    entry.judge(
                        device_id=identity.device_id, fleet=identity.fleet, serial=identity.serial
                    )
                    or Reason.CERTIFICATE_INVALID
                )
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
