"""The live sessions of one gateway worker, indexed for takeover and revocation.

Invariants:

* A connection is registered under its device id as soon as its certificate names the
  device (before CONNECT), so a revocation that arrives while it is still being
  authorised finds it too; it is removed when it closes.
* At most one connection owns a claim key ``(device id, client id)``: the one that
  claimed it last. `SessionRegistry.claim` returns the previous owner for the caller to
  end (takeover); a stale owner never unregisters its successor.
* Lookups by device cost O(sessions of that device), never O(all connections): a burst
  of revocations does not stall the event loop however many devices are connected.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["SessionRegistry"]

C = TypeVar("C")
ClaimKey = tuple[str, str | None]


class SessionRegistry(Generic[C]):
    """Connections by device id, and the owner of each ``(device id, client id)``."""

    def __init__(self) -> None:
        self._by_device: dict[str, set[C]] = {}
        self._owners: dict[ClaimKey, C] = {}
        self._claims: dict[C, ClaimKey] = {}

    def __len__(self) -> int:
        return sum(len(connections) for connections in self._by_device.values())

    def add(self, device_id: str, connection: C) -> None:
        """``connection`` speaks for ``device_id`` (its certificate says so)."""
        self._by_device.setdefault(device_id, set()).add(connection)

    def claim(self, key: ClaimKey, connection: C) -> C | None:
        """Make ``connection`` the owner of ``key``; the previous owner, if another."""
        previous = self._owners.get(key)
        self._owners[key] = connection
        self._claims[connection] = key
        return previous if previous is not connection else None

    def remove(self, device_id: str, connection: C) -> None:
        """``connection`` is closed: forget it (and its claim, unless already taken over)."""
        connections = self._by_device.get(device_id)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self._by_device[device_id]
        key = self._claims.pop(connection, None)
        if key is not None and self._owners.get(key) is connection:
            del self._owners[key]

    def of_device(self, device_id: str) -> list[C]:
        """The connections of ``device_id`` (a copy: safe to end them while iterating)."""
        return list(self._by_device.get(device_id, ()))

    def owner(self, key: ClaimKey) -> C | None:
        return self._owners.get(key)

    def __iter__(self) -> Iterator[C]:
        for connections in list(self._by_device.values()):
            yield from list(connections)
