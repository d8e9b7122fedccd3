"""The broker side of a session: where it is, and the protocol that carries its bytes.

Invariants:

* Dialled only after the device's CONNECT is authorised (the session asks for it).
* The protocol parses nothing: it hands every chunk to its device connection, and tells it
  when the broker's write buffer is high so the device's reads pause (backpressure).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Protocol, cast

__all__ = ["UpstreamPeer", "UpstreamProtocol", "UpstreamTarget", "dial"]


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where the broker listens, and the TLS context for ``mqtts://`` (else None)."""

    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None

    @classmethod
    def from_url(cls, url: str, *, ssl_context: ssl.SSLContext | None = None) -> UpstreamTarget:
        """Parse ``mqtt://HOST:PORT`` or ``mqtts://HOST:PORT``.

        Args:
            url: The upstream URL (already validated by Settings).
            ssl_context: Used for ``mqtts://``; a default verifying context if None.
        """
        scheme, _, rest = url.partition("://")
        host, _, port = rest.rstrip("/").rpartition(":")
        context = None
        if scheme == "mqtts":
            context = ssl_context or ssl.create_default_context()
        return cls(host.strip("[]"), int(port), context)


class UpstreamPeer(Protocol):
    """What the upstream protocol reports to (the device connection)."""

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_lost(self, exc: Exception | None) -> None: ...

    def pause_device(self) -> None: ...

    def resume_device(self) -> None: ...


class UpstreamProtocol(asyncio.Protocol):
    """Carries the broker's bytes to the device connection, unparsed."""

    def __init__(self, peer: UpstreamPeer) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it. No
        # TCP_NODELAY here: asyncio and uvloop set it on every TCP transport already.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.peer.upstream_data(data)

    def eof_received(self) -> bool | None:
        return False  # close: MQTT has no half-closed connections

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.peer.pause_device()

    def resume_writing(self) -> None:
        self.peer.resume_device()


async def dial(
    target: UpstreamTarget, peer: UpstreamPeer, *, within: float
) -> tuple[asyncio.Transport, UpstreamProtocol]:
    """Connect to the broker.

    Raises:
        OSError: refused or unreachable; TimeoutError after ``within`` seconds.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(within):
        transport, protocol = await loop.create_connection(
            lambda: UpstreamProtocol(peer),
            target.host,
            target.port,
            ssl=target.ssl_context,
            server_hostname=target.host if target.ssl_context else None,
        )
    return transport, protocol
