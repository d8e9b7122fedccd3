"""Retained messages: kept for new subscribers, cleared by an empty retained PUBLISH."""

from __future__ import annotations

import pytest

from tests.gateway.conftest import Device
from tests.mqtt5 import wire as w
from tests.mqtt5.clients import Entry, Paho, connected
from tests.mqtt5.conftest import Side, differential

TOPICS = ("a", "b", "c", "d")


def _retain_all(side: Side, device: Device, base: str) -> list[Entry | None]:
    """Retain "on" under every topic; the PUBACKs (0x10: no subscriber matched)."""
    publisher = connected(Paho(side, device, f"{device.device_id}-pub"))
    acks = [publisher.publish(f"{base}/{name}", b"on", retain=True) for name in TOPICS]
    publisher.disconnect()
    return acks


def _retained(side: Side, device: Device, base: str, client_id: str) -> list[Entry]:
    """What a new subscriber to ``base/#`` gets at once: the retained messages, sorted."""
    subscriber = connected(Paho(side, device, client_id))
    assert subscriber.subscribe(f"{base}/#")[0] == "suback"
    got = sorted(subscriber.quiet(0.3))
    subscriber.disconnect()
    return got


def test_empty_retained_publish_clears(sides: tuple[Side, Side], device: Device) -> None:
    base = f"devices/{device.device_id}/state"

    def run(side: Side) -> list[object]:
        acks = _retain_all(side, device, base)
        before = _retained(side, device, base, f"{device.device_id}-s1")
        watcher = connected(Paho(side, device, f"{device.device_id}-live"))
        watcher.subscribe(f"{base}/#")
        watcher.quiet(0.3)  # its own retained copies
        clearer = connected(Paho(side, device))
        for name in TOPICS[:2]:
            clearer.publish(f"{base}/{name}", b"", retain=True)
        clearer.disconnect()
        live = watcher.take(2)  # a clearing PUBLISH still reaches live subscribers
        watcher.disconnect()
        after = _retained(side, device, base, f"{device.device_id}-s2")
        return [acks, before, live, after]

    direct, gateway = differential(sides, run)
    retained = ("message", f"{base}/c", b"on", 1, True, {})
    assert direct[0] == [("published", 0x10, {})] * 4
    assert direct[1][2] == retained and len(direct[1]) == 4
    assert direct[3] == [retained, ("message", f"{base}/d", b"on", 1, True, {})]
    assert gateway == direct


@pytest.mark.parametrize(
    "with_connect",
    [pytest.param(False, id="after-connack"), pytest.param(True, id="with-connect")],
)
def test_empty_retained_publishes_and_disconnect_in_one_write(
    sides: tuple[Side, Side], device: Device, with_connect: bool
) -> None:
    """A device that writes its goodbye at once and powers down: four clearing PUBLISHes
    and its DISCONNECT in one write (after the CONNACK, or with the CONNECT itself), then
    the socket closes without reading. Every PUBLISH must reach the broker, and the will
    must not fire: the session ended with a normal DISCONNECT."""
    base = f"devices/{device.device_id}/state"
    status = f"devices/{device.device_id}/status"

    def run(side: Side) -> list[object]:
        assert _retain_all(side, device, base) == [("published", 0x10, {})] * 4
        watcher = connected(Paho(side, device, f"{device.device_id}-watch"))
        watcher.subscribe(status)
        client = w.Wire(side.socket(device))
        goodbye = [w.publish(f"{base}/{name}", b"", retain=True) for name in TOPICS]
        hello = w.connect(device.device_id, will=(status, b"gone"))
        if with_connect:
            client.send(hello, *goodbye, w.disconnect())
        else:
            client.send(hello)
            connack = client.recv()
            assert connack is not None and connack[0] == "CONNACK" and connack[2][1] == 0
            client.send(*goodbye, w.disconnect())
        client.close()
        will = watcher.quiet(0.5)
        watcher.disconnect()
        return [will, _retained(side, device, base, f"{device.device_id}-s")]

    direct, gateway = differential(sides, run)
    assert direct == [[], []]
    assert gateway == direct
