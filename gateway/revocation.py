"""Is this device, with this certificate, allowed in right now, and is it still?

Invariants:

* One small interface, `DeviceDirectory`, answers per CONNECT with a `Reason`:
  ``OK`` or why not. The bridge never queries the registry any other way.
* Fail closed: a certificate not in the registry, registered to another device, or an
  unknown device is refused; a lookup that fails raises (or answers
  ``revocation_state_stale``), and the caller refuses.
* `verdict` is the one decision from registry rows, shared by `PostgresDirectory` (a query
  per CONNECT) and the cache (`DeviceStates`, kept current by
  `gateway.revocation_listen.RevocationCache`).
* `DeviceStates` caches, per device, the rows looked up (device status and fleet; status
  and owner of each certificate the device presented), LRU-bounded. Rows that appear
  without a notification (a new device, a renewed certificate) are simply not cached yet:
  unknown keys are always looked up, never answered from a negative cache.
* What a notice cuts (`cut_reason`): device ``disabled`` / ``revoked`` cut all of the
  device's sessions; certificate ``revoked`` / ``superseded`` the sessions on that
  certificate; device ``active`` (enabled) cuts nothing.
* Superseded (renewed) certificates are cut too: zero trust means a session lives only
  as long as its credential would be admitted now, and a superseded certificate is not.
  A renewing device reconnects with its new certificate anyway (it has to, to use it);
  it sees DISCONNECT 0x98 on MQTT 5, and its reconnection is an ordinary CONNECT.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

import asyncpg

from gateway.identity import DeviceIdentity
from schemas.events import Reason
from schemas.notify import RevocationNotice

__all__ = [
    "LOOKUP",
    "DeviceDirectory",
    "DeviceStates",
    "LiveDirectory",
    "PostgresDirectory",
    "RevocationListener",
    "cut_reason",
    "verdict",
]

LOOKUP: Final = """
SELECT d.status AS device_status, d.fleet, c.status AS cert_status, c.device_id AS cert_device
FROM devices d LEFT JOIN certificates c ON c.serial = $2
WHERE d.device_id = $1
"""
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
        row = await self._pool.fetchrow(LOOKUP, device_id, serial)
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


class DeviceStates:
    """The registry rows a `RevocationCache` holds, least recently used first.

    Per device: its status and fleet, and the status and owner of each certificate it
    presented (the last `_CERTS_PER_DEVICE`). Pure state, no I/O: the listener
    (`gateway.revocation_listen`) fills it from lookups and reloads, applies notices to it,
    and decides whether it is current.
    """

    def __init__(self, max_devices: int) -> None:
        self.max_devices = max_devices
        self._devices: OrderedDict[str, _Device] = OrderedDict()

    @property
    def count(self) -> int:
        """How many devices it holds (no ``__len__``: an empty cache is not falsy)."""
        return len(self._devices)

    def judge(self, *, device_id: str, fleet: str, serial: str) -> Reason | None:
        """The verdict from the cached rows (the device becomes the most recently used), or
        None when they cannot tell: device or certificate not cached."""
        entry = self._devices.get(device_id)
        if entry is None:
            return None
        known = entry.judge(device_id=device_id, fleet=fleet, serial=serial)
        if known is not None:
            self._devices.move_to_end(device_id)
        return known

    def store(
        self,
        device_id: str,
        *,
        status: str,
        fleet: str,
        serial: str,
        cert_owner: str | None,
        cert_status: str | None,
    ) -> None:
        """Remember what a lookup read (``cert_status`` None: the certificate is unknown,
        which is not cached: it may be registered any moment)."""
        entry = self._devices.get(device_id)
        if entry is None:
            entry = self._devices[device_id] = _Device(status, fleet)
        else:
            entry.status, entry.fleet = status, fleet
        if cert_status is not None and cert_owner is not None:
            _remember(entry, serial, cert_owner, cert_status)
        self._devices.move_to_end(device_id)
        self._evict()

    def apply(self, notice: RevocationNotice) -> None:
        """Bring the cached rows in line with ``notice`` (rows not cached stay so)."""
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

    def held(self) -> tuple[set[str], set[str]]:
        """The device ids and certificate serials held (what a reload re-reads)."""
        serials = {serial for entry in self._devices.values() for serial in entry.certs}
        return set(self._devices), serials

    def rebuild(
        self,
        devices: Iterable[asyncpg.Record],
        certificates: Iterable[asyncpg.Record],
        deferred: Iterable[RevocationNotice],
    ) -> None:
        """Replace the rows with a reload's snapshot, then replay the notices that arrived
        while it ran (they may be newer than the snapshot; replaying is idempotent)."""
        # Rebuild in the old LRU order (new live devices last).
        order = {device_id: i for i, device_id in enumerate(self._devices)}
        rebuilt: OrderedDict[str, _Device] = OrderedDict()
        for row in sorted(devices, key=lambda r: order.get(r["device_id"], len(order))):
            rebuilt[row["device_id"]] = _Device(row["status"], row["fleet"])
        for row in certificates:  # kept under the owner only: elsewhere it is invalid anyway
            entry = rebuilt.get(row["device_id"])
            if entry is not None:
                _remember(entry, row["serial"], row["device_id"], row["status"])
        self._devices = rebuilt
        for notice in deferred:
            self.apply(notice)
        self._evict()

    def reverify(self, identity: DeviceIdentity) -> Reason:
        """The verdict on a live session after a reload, which read every live serial: a
        certificate not cached now is not in the registry."""
        entry = self._devices.get(identity.device_id)
        if entry is None:
            return Reason.DEVICE_UNKNOWN
        known = entry.judge(
            device_id=identity.device_id, fleet=identity.fleet, serial=identity.serial
        )
        return known or Reason.CERTIFICATE_INVALID

    def _evict(self) -> None:
        while len(self._devices) > self.max_devices:
            self._devices.popitem(last=False)


def _remember(entry: _Device, serial: str, owner: str, status: str) -> None:
    entry.certs.pop(serial, None)
    entry.certs[serial] = (owner, status)
    while len(entry.certs) > _CERTS_PER_DEVICE:
        del entry.certs[next(iter(entry.certs))]
