"""The gateway server: listener, live connections, policy, event recording, shutdown.

Invariants:

* One live session per device and client id: a new one, once its CONNECT is authorised
  and before it reaches the broker, kicks the old one
  (DISCONNECT 0x8E on v5), and both are recorded. Keyed by client id too because a fleet
  whose policy allows ``{device_id}-*`` deliberately runs several clients per device;
  under the default policy (client id = device id) this is one session per device.
* Events that do not gate admission are recorded in the background; `Gateway.close`
  waits for them, so a clean shutdown loses none.
* The policy document is swapped atomically on reload; sessions keep the fleet policy
  they started with (decisions are cached per session).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any

from gateway.audit import EventSink
from gateway.bridge import BridgeConfig, DeviceConnection
from gateway.policy import PolicyError, load_policy
from gateway.revocation import DeviceDirectory
from gateway.tls import server_context
from gateway.upstream import UpstreamTarget
from schemas.errors import DevicegateError
from schemas.events import AuthEvent, Reason
from schemas.policy import FleetPolicy, PolicyDocument
from schemas.settings import Settings

__all__ = ["Gateway", "GatewayConfigError", "config_from_settings"]

log = logging.getLogger("devicegate.gateway")


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
        instance=settings.instance_id,
        trust_domain=settings.trust_domain,
        ssl_context=context,
        upstream=UpstreamTarget.from_url(settings.upstream_url),
        handshake_timeout=settings.handshake_timeout.total_seconds(),
        connect_timeout=settings.connect_timeout.total_seconds(),
        max_packet_size=settings.max_packet_size,
    )


class Gateway:
    """Accepts devices on ``host:port`` and bridges them to the upstream broker.

    Use as ``async with Gateway(...) as gateway:``, or ``await start()`` / ``await close()``.
    """

    def __init__(
        self,
        *,
        config: BridgeConfig,
        sink: EventSink,
        directory: DeviceDirectory,
        host: str,
        port: int,
        policy: PolicyDocument | None = None,
        policy_file: Path | None = None,
        max_connections: int = 10_000,
    ) -> None:
        self.config = config
        self.sink = sink
        self.directory = directory
        self.host = host
        self.port = port
        self.policy_file = policy_file
        self.policy = policy if policy is not None else load_policy(policy_file)
        self.max_connections = max_connections
        self.connections: set[DeviceConnection] = set()
        self._by_device: dict[tuple[str, str | None], DeviceConnection] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Start listening (port 0 picks a free port, see ``self.port``)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: DeviceConnection(self), self.host, self.port, reuse_address=True, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("gateway listening on %s:%s", self.host, self.port)

    async def close(self) -> None:
        """Stop accepting, end every session (server_shutting_down), flush the events."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.kick(Reason.SERVER_SHUTTING_DOWN)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def revoke(self, device_id: str, *, reason: Reason, serial: str | None = None) -> int:
        """End the sessions of ``device_id`` (only those on ``serial`` if given).

        The hook for live revocation: each session gets DISCONNECT 0x98 on MQTT 5 (closed on
        3.1.1) and a ``session_revoked`` event with ``reason``.

        Returns:
            How many connections were ended.
        """
        doomed = [
            connection
            for connection in self.connections
            if connection.session is not None
            and connection.session.identity.device_id == device_id
            and (serial is None or connection.session.identity.serial == serial)
        ]
        for connection in doomed:
            connection.kick(reason, revoked=True)
        return len(doomed)

    def reload_policy(self) -> bool:
        """Re-read the policy file (SIGHUP); keep the old policy if the new one is invalid."""
        try:
            self.policy = load_policy(self.policy_file)
        except PolicyError as exc:
            log.error("policy not reloaded: %s", exc)
            return False
        log.info("policy reloaded from %s", self.policy_file)
        return True

    # --- bridge.Hub ----------------------------------------------------------------

    def fleet_policy(self, fleet: str) -> FleetPolicy:
        return self.policy.for_fleet(fleet)

    def record(self, event: AuthEvent) -> None:
        self.spawn(self._record(event), "record-event")

    async def _record(self, event: AuthEvent) -> None:
        try:
            await self.sink.record(event)
        except Exception:
            log.exception("could not record %s event %s", event.type, event.id)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def opened(self, connection: DeviceConnection) -> bool:
        if len(self.connections) >= self.max_connections:
            return False
        self.connections.add(connection)
        return True

    def claim(self, connection: DeviceConnection) -> None:
        assert connection.session is not None
        key = (connection.session.identity.device_id, connection.session.client_id)
        previous = self._by_device.get(key)
        self._by_device[key] = connection
        if previous is not None and previous is not connection:
            previous.kick(Reason.SESSION_TAKEN_OVER)

    def closed(self, connection: DeviceConnection) -> None:
        self.connections.discard(connection)
        session = connection.session
        if session is not None:
            key = (session.identity.device_id, session.client_id)
            if self._by_device.get(key) is connection:
                del self._by_device[key]
