"""Is this device, with this certificate, allowed in right now?

Invariants:

* One small interface, `DeviceDirectory`, answers per CONNECT with a `Reason`:
  ``OK`` or why not. The bridge never queries the registry any other way, so a later
  LISTEN/NOTIFY cache (with its staleness bound) slots in behind the same method.
* Fail closed: a certificate not in the registry, registered to another device, or an
  unknown device is refused; a lookup that fails raises, and the caller refuses.
"""

from __future__ import annotations

from typing import Final, Protocol

import asyncpg

from schemas.events import Reason

__all__ = ["DeviceDirectory", "PostgresDirectory", "verdict"]

_QUERY: Final = """
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


class DeviceDirectory(Protocol):
    """The registry as the gateway sees it."""

    async def check(self, *, device_id: str, fleet: str, serial: str) -> Reason:
        """``Reason.OK`` if the device and certificate may connect, else the refusal reason.

        Raises:
            Exception: the state is unavailable; the caller must refuse (fail closed).
        """
        ...


def verdict(
    *,
    fleet: str,
    device_status: str | None,
    device_fleet: str | None,
    cert_status: str | None,
    cert_device: str | None,
    device_id: str,
) -> Reason:
    """The decision from registry rows (shared by the direct lookup and a future cache)."""
    if device_status is None:
        return Reason.DEVICE_UNKNOWN
    device_reason = _DEVICE_STATUS.get(device_status, Reason.DEVICE_DISABLED)
    if device_reason is not Reason.OK:
        return device_reason
    if cert_status is None or cert_device != device_id or device_fleet != fleet:
        return Reason.CERTIFICATE_INVALID  # not ours to vouch for: not registered to it
    return _CERT_STATUS.get(cert_status, Reason.CERTIFICATE_REVOKED)


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
