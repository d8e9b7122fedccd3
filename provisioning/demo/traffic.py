"""Devices talking through the gateway: telemetry publishers and a dashboard that reads it.

The dashboard is a device of the ``dashboard`` fleet, which the demo's policy file lets
subscribe to ``devices/+/telemetry`` and nothing else (see `stack.DEMO_POLICY`). Under
the default policy no device may read another's topics, so the grant has to be explicit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiomqtt

from provisioning.agent.device import gateway_ssl_context
from provisioning.demo.factory import Enrolled

DASHBOARD_FILTER = "devices/+/telemetry"
CONNECT_CONCURRENCY = 25
MQTT_TIMEOUT = 10.0


def telemetry_topic(device_id: str) -> str:
    return f"devices/{device_id}/telemetry"


@contextlib.asynccontextmanager
async def mqtt_session(
    port: int,
    *,
    identifier: str,
    tls_context: ssl.SSLContext,
    keepalive: int = 30,
) -> AsyncIterator[aiomqtt.Client]:
    """An MQTT 5 session through the gateway with ``tls_context``'s client certificate."""
    client = aiomqtt.Client(
        hostname="127.0.0.1",
        port=port,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=tls_context,
        keepalive=keepalive,
        timeout=MQTT_TIMEOUT,
    )
    async with client:
        yield client


def device_session(
    port: int, device: Enrolled, *, identifier: str | None = None
) -> contextlib.AbstractAsyncContextManager[aiomqtt.Client]:
    """A session as ``device`` (its own certificate), with its own id as client id by default."""
    return mqtt_session(
        port,
        identifier=identifier or device.device_id,
        tls_context=gateway_ssl_context(device.directory),
    )


@dataclass
class Dashboard:
    """What the dashboard has seen, per device."""

    received: dict[str, int] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)
    """Payloads that claim to come from a device other than the topic's: must stay empty."""
    total: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, count: int, *, within: float) -> bool:
        """Whether ``count`` readings arrive within ``within`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self.total < count:
                    self._changed.clear()
                    await self._changed.wait()
        return self.total >= count

    def take(self, topic: str, payload: bytes) -> None:
        device_id = topic.split("/")[1]
        self.received[device_id] = self.received.get(device_id, 0) + 1
        self.total += 1
        self._changed.set()
        with contextlib.suppress(ValueError, AttributeError):
            sender = json.loads(payload).get("from")
            if sender not in (None, device_id):
                self.foreign.append(f"{sender} -> {topic}")


async def run_dashboard(
    port: int, dashboard: Enrolled, seen: Dashboard, ready: asyncio.Event
) -> None:
    """Subscribe to every device's telemetry and count it until cancelled."""
    async with device_session(port, dashboard) as client:
        await client.subscribe(DASHBOARD_FILTER, qos=1)
        ready.set()
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            seen.take(str(message.topic), payload)


async def publish_telemetry(
    port: int,
    devices: list[Enrolled],
    *,
    messages: int,
    on_published: Callable[[], None] | None = None,
    concurrency: int = CONNECT_CONCURRENCY,
) -> None:
    """Each device connects over mutual TLS and publishes ``messages`` readings (QoS 1)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(device: Enrolled, index: int) -> None:
        async with gate, device_session(port, device) as client:
            for sequence in range(messages):
                reading = {
                    "from": device.device_id,
                    "seq": sequence,
                    "temperature_c": round(20 + (index * 7 + sequence * 3) % 15 * 0.5, 1),
                    "ts": time.time(),
                }
                await client.publish(
                    telemetry_topic(device.device_id), json.dumps(reading).encode(), qos=1
                )
                if on_published is not None:
                    on_published()

    async with asyncio.TaskGroup() as group:
        for index, device in enumerate(devices):
            group.create_task(one(device, index), name=f"telemetry-{device.device_id}")
