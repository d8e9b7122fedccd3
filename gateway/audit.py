"""What the bridge records, and the one interface it records through.

Invariants:

* `EventSink.record` returns once the event is durable; the bridge awaits it before
  admitting a session, and records every other decision without blocking the packet path.
* `EventContext` holds what every event of one connection shares (instance, peer, TLS,
  certificate, trace id), so the sans-IO session builds complete `AuthEvent` values
  itself: an event is built once with its trace id, never copied to add it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.events.interface import EventSink
from gateway.identity import DeviceIdentity
from schemas.certificates import PresentedCertificate, presented_detail
from schemas.events import AuthEvent, EventType, Outcome, Reason

__all__ = ["EventContext", "EventSink"]

# The events that say how the connection was established.
_RESUMPTION_EVENTS = frozenset({EventType.CONNECT, EventType.TLS_HANDSHAKE})


@dataclass(frozen=True, slots=True)
class EventContext:
    """The fields shared by every event of one device connection."""

    instance: str
    peer_address: str | None = None
    tls_version: str | None = None
    tls_cipher: str | None = None
    identity: DeviceIdentity | None = None
    proxy: str | None = None
    """The load balancer's address when ``peer_address`` came from a PROXY v2 header."""
    trace_id: str | None = None
    """The connection's trace (32 hex digits), put in every event's ``detail.trace_id``."""
    resumed: bool = False
    """The TLS session was resumed from a ticket: its CONNECT and TLS events say
    ``detail.resumed`` (true), so a resumption is as visible as a full handshake."""

    def with_tls(
        self,
        version: str | None,
        cipher: str | None,
        identity: DeviceIdentity | None = None,
        *,
        resumed: bool = False,
    ) -> EventContext:
        """This context once the handshake is done (and, when read, the certificate's
        identity). Built directly: ``dataclasses.replace`` costs more, once per connection."""
        return EventContext(
            self.instance,
            self.peer_address,
            version,
            cipher,
            identity,
            self.proxy,
            self.trace_id,
            resumed,
        )

    def event(
        self,
        type_: EventType,
        reason: Reason,
        *,
        outcome: Outcome | None = None,
        client_id: str | None = None,
        detail: dict[str, Any] | None = None,
        presented: PresentedCertificate | None = None,
    ) -> AuthEvent:
        """An event of this connection; outcome defaults from the reason (``ok``: allowed).

        ``presented``: a certificate that identifies no device (a refused one), named in
        ``cert_serial``/``cert_fingerprint`` and ``detail.presented`` when there is no
        identity.
        """
        identity = self.identity
        if outcome is None:
            outcome = Outcome.ALLOWED if reason is Reason.OK else Outcome.DENIED
        if self.proxy is not None:
            detail = {**(detail or {}), "proxy": self.proxy}
        if self.trace_id is not None:
            detail = {**(detail or {}), "trace_id": self.trace_id}
        if self.resumed and type_ in _RESUMPTION_EVENTS:
            detail = {**(detail or {}), "resumed": True}
        serial = fingerprint = None
        if identity is not None:
            serial, fingerprint = identity.serial, identity.fingerprint
        elif presented is not None:
            serial, fingerprint = presented.serial, presented.fingerprint
            detail = {**(detail or {}), "presented": presented_detail(presented)}
        return AuthEvent(
            instance=self.instance,
            type=type_,
            outcome=outcome,
            reason=reason,
            device_id=identity.device_id if identity else None,
            fleet=identity.fleet if identity else None,
            cert_serial=serial,
            cert_fingerprint=fingerprint,
            client_id=client_id,
            peer_address=self.peer_address,
            tls_version=self.tls_version,
            tls_cipher=self.tls_cipher,
            detail=detail or {},
        )
