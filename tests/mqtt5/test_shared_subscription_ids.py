"""Shared subscriptions ($share/<group>/<filter>: each message to one member) with
aiomqtt, and Subscription Identifiers on deliveries with paho."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from tests.gateway.conftest import Device
from tests.mqtt5.clients import Paho, aiomqtt_client, connected
from tests.mqtt5.conftest import Side, adifferential, differential

JOBS = 6


async def _collect(client: Any, into: list[bytes]) -> None:
    async for message in client.messages:
        into.append(message.payload)


async def test_shared_subscription_delivers_to_one_member(
    sides: tuple[Side, Side], device: Device
) -> None:
    topic = f"devices/{device.device_id}/jobs"
    members = ("w1", "w2")

    async def run(side: Side) -> list[object]:
        got: dict[str, list[bytes]] = {name: [] for name in members}
        out: list[object] = []
        async with contextlib.AsyncExitStack() as stack:
            tasks = []
            for name in members:
                client = await stack.enter_async_context(
                    aiomqtt_client(side, device, f"{device.device_id}-{name}")
                )
                codes = await client.subscribe(f"$share/g/{topic}", qos=1)
                out.append([getattr(code, "value", code) for code in codes])
                tasks.append(asyncio.create_task(_collect(client, got[name])))
            async with aiomqtt_client(side, device, f"{device.device_id}-pub") as publisher:
                for i in range(JOBS):
                    await publisher.publish(topic, b"j%d" % i, qos=1)
            async with asyncio.timeout(5):
                while sum(map(len, got.values())) < JOBS:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # time for a duplicate to show up, if one would
            for task in tasks:
                task.cancel()
        out.append(got)
        return out

    direct, gateway = await adifferential(sides, run)
    got = direct[-1]
    assert isinstance(got, dict)
    assert sorted(got["w1"] + got["w2"]) == [b"j%d" % i for i in range(JOBS)]
    assert got["w1"] and got["w2"]  # Mosquitto takes turns between the members
    assert gateway == direct


def test_subscription_identifiers(sides: tuple[Side, Side], device: Device) -> None:
    """Deliveries carry the identifier of the subscription they matched (Mosquitto sends
    one copy per matching subscription); a subscription replaced without one delivers
    without."""
    base = f"devices/{device.device_id}/sid"

    def run(side: Side) -> list[object]:
        subscriber = connected(Paho(side, device))
        out: list[object] = [
            subscriber.subscribe(f"{base}/#", qos=1, SubscriptionIdentifier=7),
            subscriber.subscribe(f"{base}/+/x", qos=1, SubscriptionIdentifier=300),
        ]
        publisher = connected(Paho(side, device, f"{device.device_id}-pub"))
        publisher.publish(f"{base}/a/x", b"both", qos=1)
        publisher.publish(f"{base}/b", b"one", qos=1)
        out.append(sorted(subscriber.take(3), key=repr))  # copies: in no promised order
        out.append(subscriber.subscribe(f"{base}/+/x", qos=1))  # same filter, no identifier
        publisher.publish(f"{base}/c/x", b"again", qos=1)
        out.append(sorted(subscriber.take(2), key=repr))
        out.append(subscriber.quiet(0.2))
        publisher.disconnect()
        subscriber.disconnect()
        return out

    direct, gateway = differential(sides, run)

    def message(topic: str, payload: bytes, *ids: int) -> tuple[object, ...]:
        return (
            "message",
            f"{base}/{topic}",
            payload,
            1,
            False,
            {"SubscriptionIdentifier": [*ids]} if ids else {},
        )

    assert direct[2:] == [
        sorted(
            [message("a/x", b"both", 7), message("a/x", b"both", 300), message("b", b"one", 7)],
            key=repr,
        ),
        ("suback", [1], {}),
        sorted([message("c/x", b"again", 7), message("c/x", b"again")], key=repr),
        [],
    ]
    assert gateway == direct
