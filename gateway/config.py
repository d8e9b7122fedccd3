"""What every connection of one gateway shares (`BridgeConfig`), and how `Settings` make it.

Invariants:

* Built once per worker, before the listener opens, and never changed: a connection reads
  its timeouts, limits and TLS context from here, not from `Settings`.
* A configuration that cannot work (TLS files missing or unusable) fails here, at start,
  with `GatewayConfigError` saying what to do, never at the first handshake.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from gateway.denials import DenialLimits
from gateway.limits import ConnectLimits
from gateway.tickets import RESUMPTION, TicketKeyError, TicketKeys
from gateway.tls import server_context
from gateway.upstream import UpstreamTarget
from schemas.errors import DevicegateError
from schemas.settings import Settings
from schemas.ticket_keys import TICKET_KEYS_FILE

__all__ = ["BridgeConfig", "GatewayConfigError", "config_from_settings"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """What every connection of one gateway shares."""

    instance: str
    trust_domain: str
    ssl_context: ssl.SSLContext
    upstream: UpstreamTarget
    handshake_timeout: float
    connect_timeout: float
    max_packet_size: int
    dial_timeout: float = 5.0
    proxy_protocol_from: tuple[IPv4Network | IPv6Network, ...] = ()
    """Peers that must send a PROXY v2 header (empty: PROXY protocol off)."""
    denials: DenialLimits = field(default_factory=DenialLimits)
    """Each session's denial budget (`gateway.denials`)."""
    tickets: TicketKeys | None = None
    """The session ticket keys (None: resumption off, every connection a full handshake)."""
    connects: ConnectLimits | None = None
    """Each device's connect budget, per worker (`gateway.limits.ConnectLimiter`; None: off)."""


class GatewayConfigError(DevicegateError):
    """The gateway cannot start with this configuration (message says why)."""


def config_from_settings(settings: Settings) -> BridgeConfig:
    """The connection settings from ``Settings`` (reads the server's TLS files).

    Raises:
        GatewayConfigError: the TLS files are missing or unusable.
    """
    pki = settings.pki_dir
    try:
        context = server_context(pki / "chain.pem", pki / "server.crt", pki / "server.key")
    except (OSError, ssl.SSLError) as exc:
        raise GatewayConfigError(
            f"cannot load chain.pem, server.crt and server.key from {pki}: {exc}; "
            "run `devicegate ca init` first"
        ) from None
    return BridgeConfig(
        tickets=_tickets(settings, context),
        instance=settings.instance_id,
        trust_domain=settings.trust_domain,
        ssl_context=context,
        upstream=UpstreamTarget.from_url(settings.upstream_url),
        handshake_timeout=settings.handshake_timeout.total_seconds(),
        connect_timeout=settings.connect_timeout.total_seconds(),
        max_packet_size=settings.max_packet_size,
        proxy_protocol_from=tuple(settings.proxy_protocol_from),
        denials=DenialLimits(
            per_window=settings.denials_per_window,
            events_per_window=settings.denial_events_per_window,
            window=settings.denial_window.total_seconds(),
        ),
        connects=ConnectLimits(
            per_minute=settings.device_connects_per_minute, burst=settings.device_connect_burst
        )
        if settings.device_connects_per_minute
        else None,
    )


def _tickets(settings: Settings, context: ssl.SSLContext) -> TicketKeys | None:
    """Resumption as configured: on with the key file, off (warned) without it."""
    if not settings.tls_resumption:
        return None
    path = settings.tls_ticket_keys or settings.pki_dir / TICKET_KEYS_FILE
    if not RESUMPTION:
        log.warning(
            "TLS resumption is off: gateway._tlsext is not built (reinstall with a C "
            "compiler and OpenSSL's headers at hand)"
        )
        return None
    if not path.exists():
        log.warning(
            "TLS resumption is off: no ticket key file %s (run `devicegate ticket-keys "
            "rotate`, or set DEVICEGATE_TLS_RESUMPTION=false to silence this)",
            path,
        )
        return None
    try:
        return TicketKeys(context, path, settings.tls_ticket_lifetime.total_seconds())
    except TicketKeyError as exc:
        raise GatewayConfigError(str(exc)) from None
