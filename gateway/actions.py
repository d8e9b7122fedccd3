"""What the sans-IO session asks the bridge to do: plain values, executed in order."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.events import AuthEvent, Reason

__all__ = [
    "Action",
    "Admit",
    "CheckDevice",
    "Close",
    "DialUpstream",
    "Record",
    "ToDevice",
    "ToUpstream",
]


@dataclass(frozen=True, slots=True)
class ToUpstream:
    """Write these bytes to the broker."""

    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class ToDevice:
    """Write these (plaintext) bytes to the device."""

    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Record:
    """Record this event (without holding up the packet path)."""

    event: AuthEvent


@dataclass(frozen=True, slots=True)
class CheckDevice:
    """Ask the device directory; answer with ``Session.device_checked``."""


@dataclass(frozen=True, slots=True)
class DialUpstream:
    """Connect to the broker and send ``connect``; on failure ``Session.upstream_failed``."""

    connect: bytes


@dataclass(frozen=True, slots=True)
class Admit:
    """Await ``record(event)``, then send ``connack`` and call ``Session.admitted``.

    If recording fails, call ``Session.admission_failed`` instead.
    """

    event: AuthEvent
    connack: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close both sides (after writing what came before). The session is over."""

    reason: Reason


Action = ToUpstream | ToDevice | Record | CheckDevice | DialUpstream | Admit | Close
