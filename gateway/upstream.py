"""The broker side of a session: where it is, and the protocol that carries its bytes.

Invariants:

* Dialled only after the device's CONNECT is authorised (the session asks for it).
* The protocol parses nothing: it hands every chunk to its device connection, and tells it
  when the broker's write buffer is high so the device's reads pause (backpressure).
* Closed only by `close_lingering`: what was written reaches the broker before the close,
  whatever the broker is still sending. Closing a socket with unread input makes Linux
  answer with a RST (RFC 2525 2.17), and a broker hit by one mid-stream drops the input it
  has not processed yet: Mosquitto fails its next write with EPIPE ("Broken pipe") and
  discards the rest of the session, its DISCONNECT included, so the will fires.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Protocol, cast

__all__ = ["UpstreamPeer", "UpstreamProtocol", "UpstreamTarget", "close_lingering", "dial"]


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


class _Detached:
    """The peer of a lingering connection: the broker's last bytes go nowhere."""

    def upstream_data(self, data: bytes) -> None:
        pass

    def upstream_lost(self, exc: Exception | None) -> None:
        pass

    def pause_device(self) -> None:
        pass

    def resume_device(self) -> None:
        pass


_DETACHED = _Detached()


class UpstreamProtocol(asyncio.Protocol):
    """Carries the broker's bytes to the device connection, unparsed."""

    __slots__ = ("_gone", "_lost", "peer", "transport")  # one per held session

    def __init__(self, peer: UpstreamPeer) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self._gone = False  # connection_lost came
        self._lost: asyncio.Future[None] | None = None  # made by `linger`, not per session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it. No
        # TCP_NODELAY here: asyncio and uvloop set it on every TCP transport already.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.peer.upstream_data(data)

    def eof_received(self) -> bool | None:
        return False  # close: MQTT has no half-closed connections (nor does a lingering one)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        self.peer.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.peer.pause_device()

    def resume_writing(self) -> None:
        self.peer.resume_device()

    async def linger(self, within: float) -> None:
        """Close after the broker has read everything: see `close_lingering`."""
        transport = self.transport
        if transport is None:
            return
        self.peer = _DETACHED
        if self._gone:
            return
        lost = self._lost = asyncio.get_running_loop().create_future()
        if not transport.is_closing():
            transport.resume_reading()  # perhaps paused by a slow device: read to the end
            if transport.can_write_eof():
                transport.write_eof()  # FIN once the write buffer is out
            else:
                transport.close()  # TLS: close_notify, then reads until the broker's
        try:
            async with asyncio.timeout(within):
                await lost
        except TimeoutError:
            transport.abort()


async def close_lingering(transport: asyncio.Transport, *, within: float) -> None:
    """Close the broker connection without destroying what the broker has not read.

    Half-closes (FIN after the bytes still queued) and reads and discards until the broker
    closes: after a DISCONNECT it does at once, after a bare FIN it publishes the will and
    does. Aborted after ``within`` seconds, so a silent broker cannot hold it open. The
    device connection hears nothing more from this transport.
    """
    protocol = transport.get_protocol()
    if isinstance(protocol, UpstreamProtocol):
        await protocol.linger(within)
    else:  # not ours (never so in the gateway): nothing to linger on
        transport.close()


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
